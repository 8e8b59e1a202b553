"""loraq: fine-tune language models cheaply with LoRA, QLoRA and QA-LoRA, implemented on PyTorch.

The public API::

    model, tokenizer = loraq.load_model("smollm2-135m")   # method="qlora": quantized while loading
    loraq.apply(model, loraq.LoraConfig(r=16, alpha=32, targets="all-linear"))   # method= lora/qlora/qalora
    result = loraq.train(loraq.TrainConfig(method="qalora", out="runs/q"))   # or with model, tokenizer
    loraq.save_adapter(model, "my-adapter")          # PEFT format
    loraq.load_adapter(other_model, "my-adapter")
    merged = loraq.merge(model)                      # a plain transformers model again (QA-LoRA: still INT-k)
    loraq.merge_run("runs/q", "tuned.gguf", format="gguf")   # merge and export a run
    loraq.evaluate_run("runs/q", generations=24); loraq.plan_memory(method="qlora")
    loraq.quantize(model, loraq.LoraConfig(method="qalora", quantizer="gptq"), calibration=batches)
    loraq.save_quantized(model, tokenizer, "model-4bit")   # a quantized checkpoint load_model reads as is
    class Trainer(loraq.AdapterCheckpoints, SFTTrainer): ...   # checkpoints hold the adapter alone
"""

from .core.config import LoraConfig
from .core.inject import apply, disable_adapters, merge, parameter_summary, quantize, set_active_adapter, unload
from .errors import LoraqError
from .formats.checkpoint import save_quantized
from .formats.peft import load_adapter, load_adapter_weights, save_adapter
from .product.evaluate import evaluate_run
from .product.export import merge_run
from .product.generate import generate
from .product.hf_trainer import AdapterCheckpoints
from .product.models import load_model, load_tokenizer
from .product.plan import plan_memory
from .product.train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpoints",
    "LoraConfig",
    "LoraqError",
    "TrainConfig",
    "TrainResult",
    "apply",
    "disable_adapters",
    "evaluate_run",
    "generate",
    "load_adapter",
    "load_adapter_weights",
    "load_model",
    "load_tokenizer",
    "merge",
    "merge_run",
    "parameter_summary",
    "plan_memory",
    "quantize",
    "save_adapter",
    "save_quantized",
    "set_active_adapter",
    "train",
    "unload",
]
