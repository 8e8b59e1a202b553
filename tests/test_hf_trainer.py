"""A loraq model inside transformers' Trainer and TRL's SFTTrainer: checkpoints hold the adapter alone, in
PEFT's format, and a run resumes from one to the same result."""

import json

import pytest
import torch
from conftest import E2E_TINY
from peft import PeftModel

import loraq
from loraq import LoraConfig
from loraq.core.inject import lora_layers
from loraq.product.data import encode_all, load_examples

pytest.importorskip("accelerate")


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." in k}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trainer_for(model, tokenizer, out, max_steps, **kw):
    from transformers import Trainer, TrainingArguments

    class AdapterTrainer(loraq.AdapterCheckpoints, Trainer):
        pass

    items, _ = encode_all(tokenizer, load_examples(str(E2E_TINY)), 64)

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, **kw,
    )  # fmt: skip
    return AdapterTrainer(model=model, args=args, train_dataset=ListDataset(items), data_collator=collate)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_trainer_checkpoints_hold_the_adapter_alone_and_resume(tiny_model_dir, tmp_path, method):
    model, tokenizer = loraq.load_model(tiny_model_dir)
    loraq.apply(model, LoraConfig(r=4, alpha=8, method=method))
    trainer_for(model, tokenizer, tmp_path / "a", 4).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    finished = adapter_state(model)

    # resumed from step 2 in a fresh process-like setting: same adapter at step 4
    again, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(again, LoraConfig(r=4, alpha=8, method=method))
    trainer_for(again, tokenizer, tmp_path / "b", 4).train(resume_from_checkpoint=str(checkpoint))
    resumed = adapter_state(again)
    assert finished.keys() == resumed.keys()
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], rtol=1e-4, atol=1e-5)

    if method == "lora":  # PEFT loads the checkpoint with the same logits
        tokens = torch.randint(3, len(tokenizer), (2, 12))
        plain, _ = loraq.load_model(tiny_model_dir)
        peft_model = PeftModel.from_pretrained(plain, tmp_path / "a" / "checkpoint-4")
        with torch.no_grad():
            torch.testing.assert_close(peft_model(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_sft_trainer_saves_adapters(tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    class SFT(loraq.AdapterCheckpoints, trl.SFTTrainer):
        pass

    model, tokenizer = loraq.load_model(tiny_model_dir)
    loraq.apply(model, LoraConfig(r=4, alpha=8, method="qalora"))
    records = json.loads(E2E_TINY.read_text())["examples"]
    data = Dataset.from_list([{"prompt": r["input"], "completion": r["target"]} for r in records])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, learning_rate=1e-2, max_length=64,
    )  # fmt: skip
    trainer = SFT(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    checkpoint = tmp_path / "sft" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    again, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(again, LoraConfig(r=4, alpha=8, method="qalora"))
    loraq.load_adapter_weights(again, checkpoint)
    for name, layer in lora_layers(again).items():
        torch.testing.assert_close(layer.adapters["default"].A, lora_layers(model)[name].adapters["default"].A)
