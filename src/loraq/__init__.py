"""loraq: fine-tune language models cheaply with LoRA, QLoRA and QA-LoRA, implemented on PyTorch.

The public API::

    model, tokenizer = loraq.load_model("smollm2-135m")
    loraq.apply(model, loraq.LoraConfig(r=16, alpha=32, targets="all-linear"))
    result = loraq.train(loraq.TrainConfig(method="qalora", out="runs/q"))   # or with model, tokenizer
    loraq.save_adapter(model, "my-adapter")          # PEFT format
    loraq.load_adapter(other_model, "my-adapter")
    merged = loraq.merge(model)                      # a plain transformers model again (QA-LoRA: still INT-k)
    loraq.merge_run("runs/q", "tuned.gguf", format="gguf")   # merge and export a run
    loraq.evaluate_run("runs/q", generations=24); loraq.plan_memory(method="qlora")
"""

from .core.config import LoraConfig
from .core.inject import apply, disable_adapters, merge, parameter_summary, set_active_adapter, unload
from .errors import LoraqError
from .formats.peft import load_adapter, save_adapter
from .product.evaluate import evaluate_run
from .product.export import merge_run
from .product.generate import generate
from .product.models import load_model, load_tokenizer
from .product.plan import plan_memory
from .product.train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraqError",
    "TrainConfig",
    "TrainResult",
    "apply",
    "disable_adapters",
    "evaluate_run",
    "generate",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "merge",
    "merge_run",
    "parameter_summary",
    "plan_memory",
    "save_adapter",
    "set_active_adapter",
    "train",
    "unload",
]
