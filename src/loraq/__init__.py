"""loraq: fine-tune language models cheaply with LoRA, implemented on PyTorch.

The public API::

    model, tokenizer = loraq.load_model("smollm2-135m")
    loraq.apply(model, loraq.LoraConfig(r=16, alpha=32, targets="all-linear"))
    ...train...
    loraq.save_adapter(model, "my-adapter")          # PEFT format
    loraq.load_adapter(other_model, "my-adapter")
    merged = loraq.merge(model)                      # a plain transformers model again
"""

from .config import LoraConfig
from .errors import LoraqError
from .generate import generate
from .inject import apply, disable_adapters, merge, parameter_summary, set_active_adapter, unload
from .models import load_model
from .peft_format import load_adapter, save_adapter
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraqError",
    "TrainConfig",
    "TrainResult",
    "apply",
    "disable_adapters",
    "generate",
    "load_adapter",
    "load_model",
    "merge",
    "parameter_summary",
    "save_adapter",
    "set_active_adapter",
    "train",
    "unload",
]
