import json

import pytest
import torch
from conftest import E2E_TINY
from peft import PeftModel

import loraq
from loraq import LoraqError, TrainConfig
from loraq.product.data import collate, encode_all, load_examples
from loraq.product.train import loss_sum, lr_at


def config(tmp_path, tiny_model_dir, **kw):
    base = dict(
        model=str(tiny_model_dir),
        data=str(E2E_TINY),
        steps=8,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        rank=4,
        alpha=8.0,
        eval_every=4,
        out=str(tmp_path / "run"),
    )
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warms_up_then_decays_to_zero():
    c = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    lrs = [lr_at(s, c) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-6 + 1e-3 * 0.001


def test_bad_options_are_all_named():
    with pytest.raises(LoraqError) as e:
        TrainConfig(steps=0, lr=-1.0, rank=0, batch_size=0)
    msg = str(e.value)
    for flag in ("--steps", "--lr", "--rank", "--batch-size"):
        assert flag in msg


def test_loss_sum_matches_transformers_loss(tiny):
    model, tok = tiny
    items, _ = encode_all(tok, load_examples(E2E_TINY)[:6], 256)
    batch = collate(items, tok.pad_token_id)
    ours, n = loss_sum(model, batch)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours / n, ref, rtol=1e-5, atol=1e-6)


def test_train_writes_run_folder_and_learns(tmp_path, tiny_model_dir, tokens):
    result = loraq.train(config(tmp_path, tiny_model_dir), progress=False)
    run = tmp_path / "run"
    assert result.val_loss_after < result.val_loss_before
    assert result.train_losses[-1] < result.train_losses[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(9))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8]
    assert all({"loss", "lr", "grad_norm", "tokens", "tok_s"} <= r.keys() for r in records[1:])
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 8 and saved["rank"] == 4
    base, _ = loraq.load_model(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, run / "adapter")
    with torch.no_grad():
        diff = (peft_model(tokens).logits - result.model(tokens).logits).abs().max()
    assert diff <= 1e-5


def test_training_is_deterministic(tmp_path, tiny_model_dir):
    a = loraq.train(config(tmp_path / "a", tiny_model_dir, steps=4), progress=False).train_losses
    b = loraq.train(config(tmp_path / "b", tiny_model_dir, steps=4), progress=False).train_losses
    assert a == b


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, tiny_model_dir):
    big = loraq.train(config(tmp_path / "a", tiny_model_dir, steps=3, batch_size=4), progress=False)
    acc = loraq.train(config(tmp_path / "b", tiny_model_dir, steps=3, batch_size=2, grad_accum=2), progress=False)
    assert big.train_losses == pytest.approx(acc.train_losses, rel=1e-4)


def test_only_adapter_parameters_change(tmp_path, tiny_model_dir):
    model, tok = loraq.load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loraq.train(config(tmp_path, tiny_model_dir, steps=2), model=model, tokenizer=tok, progress=False)
    after = loraq.merge(model).state_dict()
    for key, value in before.items():
        if "proj" not in key:
            assert torch.equal(after[key], value), key


def test_max_length_below_every_prompt_fails_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(LoraqError, match="no training example fits --max-length 8"):
        loraq.train(config(tmp_path, tiny_model_dir, max_length=8), progress=False)
    assert not (tmp_path / "run").exists()


def test_packing_and_a_separate_validation_file(tmp_path, tiny_model_dir):
    from conftest import FIXTURES

    cfg = config(tmp_path, tiny_model_dir, packing=True, val_data=str(FIXTURES / "pairs.jsonl"), steps=3, eval_every=0)
    result = loraq.train(cfg, progress=False)
    assert result.train_losses[-1] < result.train_losses[0]
    default = loraq.train(config(tmp_path / "d", tiny_model_dir, steps=1, eval_every=0), progress=False)
    assert result.val_loss_before != pytest.approx(default.val_loss_before)  # measured on the other file


def test_a_model_with_its_adapter_applied_trains_that_adapter(tmp_path, tiny_model_dir):
    model, tokenizer = loraq.load_model(tiny_model_dir)
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, method="qlora"))
    adapter = next(iter(loraq.core.inject.lora_layers(model).values())).adapters["default"]
    before = adapter.A.detach().clone()
    cfg = config(tmp_path, tiny_model_dir, steps=2, eval_every=0, method="qlora")
    result = loraq.train(cfg, model, tokenizer, progress=False)
    assert result.model is model and not torch.equal(adapter.A, before)
    other, tokenizer = loraq.load_model(tiny_model_dir)
    loraq.apply(other, loraq.LoraConfig(r=8, alpha=8))
    with pytest.raises(LoraqError, match=r"already holds adapter 'default' with r=8 \(TrainConfig: 4\)"):
        loraq.train(config(tmp_path / "b", tiny_model_dir, steps=2), other, tokenizer, progress=False)
