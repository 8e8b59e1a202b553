"""Training a loraq model inside transformers' Trainer or TRL's SFTTrainer, with checkpoints that hold the
adapter alone in PEFT's format (as PEFT models' checkpoints do) and resume from it.

    from trl import SFTTrainer

    class Trainer(loraq.AdapterCheckpoints, SFTTrainer):
        pass

    loraq.apply(model, loraq.LoraConfig(method="qlora"))
    trainer = Trainer(model=model, args=..., train_dataset=..., processing_class=tokenizer)
    trainer.train()                                   # checkpoint-N/ holds adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)        # reloads the adapter, optimizer and schedule

Without the mixin such a model trains there too, but each checkpoint is the whole model (the frozen 4-bit
codes included) and resuming needs the whole model back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.inject import lora_layers
from ..formats.peft import WEIGHTS_NAME, load_adapter_weights, save_adapter


class AdapterCheckpoints:
    """Mixin for a transformers `Trainer` subclass (SFTTrainer included), listed before it: a model with loraq
    adapters saves its active adapter alone, in PEFT format, and resumes (and loads its best checkpoint) from
    one. A model without adapters is saved and loaded as the Trainer does."""

    def _loraq_model(self):
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model if lora_layers(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._loraq_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".adapter-{os.getpid()}"
        save_adapter(model, staging)  # complete before anything in the checkpoint is replaced
        for file in staging.iterdir():
            os.replace(file, folder / file.name)
        shutil.rmtree(staging, ignore_errors=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        loraq_model = self._loraq_model() if model is None else (model if lora_layers(model) else None)
        if loraq_model is None or not (Path(resume_from_checkpoint) / WEIGHTS_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(loraq_model, resume_from_checkpoint, _active_adapter(loraq_model))
        return None

    def _load_best_model(self) -> None:
        model = self._loraq_model()
        best = self.state.best_model_checkpoint
        if model is None or best is None or not (Path(best) / WEIGHTS_NAME).is_file():
            return super()._load_best_model()
        load_adapter_weights(model, best, _active_adapter(model))
        return None


def _active_adapter(model) -> str:
    return next(layer.active for layer in lora_layers(model).values() if layer.active)
