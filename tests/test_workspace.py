"""Work buffers belong to whoever trains: lent to one model's frozen layers for a block, freed after, never
shared between models or threads."""

import threading

import torch
from test_train import config as train_config

import loraq
from loraq import LoraConfig
from loraq.quant import workspace
from loraq.quant.frozen import FrozenQuantized


def frozen_layers(model):
    return [m for m in model.modules() if isinstance(m, FrozenQuantized)]


def test_attached_lends_one_workspace_per_model_and_frees_it(tiny, tokens):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method="qlora"))
    with torch.no_grad():
        expected = model(tokens).logits
    with workspace.attached(model) as ws:
        assert all(layer.workspace is ws for layer in frozen_layers(model))
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
        assert ws.nbytes() > 0
    assert all(layer.workspace is None for layer in frozen_layers(model)) and ws.nbytes() == 0
    assert not any(isinstance(v, dict) and v for k, v in vars(workspace).items() if not k.startswith("__"))


def test_two_models_in_two_threads_do_not_share_buffers(tiny_model_dir, tokens):
    """With one process-wide buffer, two threads dequantizing at once overwrite each other's weights."""
    models = []
    for method in ("qlora", "qalora"):
        model, _ = loraq.load_model(tiny_model_dir, method=method)
        with torch.no_grad():
            models.append((model, model(tokens).logits))
    errors = []

    def run(model, expected):
        with workspace.attached(model), torch.no_grad():
            for _ in range(20):
                if not torch.equal(model(tokens).logits, expected):
                    errors.append("mismatch")

    threads = [threading.Thread(target=run, args=pair) for pair in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_training_releases_its_workspace(tmp_path, tiny_model_dir):
    result = loraq.train(train_config(tmp_path, tiny_model_dir, method="qlora", steps=2, eval_every=0), progress=False)
    layers = frozen_layers(result.model)
    assert layers and all(layer.workspace is None for layer in layers)
