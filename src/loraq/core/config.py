"""The adapter configuration, validated once, up front."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import LoraqError

METHODS = ("lora", "qlora", "qalora")
QALORA_BITS = (2, 3, 4, 8)
# The quantizers (quant/schemes/ REGISTRY names) each method may use; the first is its default ("auto").
METHOD_QUANTIZERS = {"lora": ("none",), "qlora": ("nf4", "fp4"), "qalora": ("rtn", "gptq")}
INITS = ("kaiming", "gaussian")
POOLINGS = ("sum", "mean")
# QA-LoRA group-constant training: which of each group's constants (scale, offset) train besides the adapter
CONSTANTS = ("none", "offset", "scale", "both")


@dataclass
class LoraConfig:
    """What to attach to a model and how.

    Args:
        r: rank of the update B·A.
        alpha: scaling numerator; the update is scaled by alpha/r (or alpha/sqrt(r) with use_rslora).
        dropout: dropout on the adapter input during training.
        targets: which linear layers get an adapter. A list of names matches a module whose name is the
            entry or ends with "." + entry (PEFT's rule); a single string other than "all-linear" is a
            regular expression that must match the whole module name; "all-linear" is every linear layer
            except the output head.
        init: "kaiming" (kaiming-uniform with a=sqrt(5), as PEFT and loralib) or "gaussian" (N(0, 1/r)).
        use_rslora: rank-stabilised scaling alpha/sqrt(r).
        method: the frozen base the adapter trains on: "lora" (as loaded); "qlora" (NF4 with
            double-quantized constants); or "qalora" (group-wise INT-k, the adapter input mean-pooled over each
            quantization group, so that the adapter merges exactly into the group offsets). `apply` builds
            that base on a full-precision model.
        bits, group_size: the INT-k base of "qalora" (k in 2, 3, 4, 8; a power-of-two group size, which is
            also the adapter's pooling window).
        quantizer: "auto" (the method's default), or for "qlora" "nf4" / "fp4", for "qalora" "rtn"
            (round-to-nearest; a Q4_1 GGUF's own codes at 4 bits, groups of 32) / "gptq" (calibrated).
        pooling: QA-LoRA's pooling of each group's inputs before A: "sum" (the QA-LoRA paper's pseudocode:
            trains at LoRA's learning rates and alphas) or "mean" (the reference code; A's effect then grows
            group_size times slower under Adam, DESIGN.md §8; what adapters saved before loraq 0.2 use).
        train_constants: QA-LoRA only: also train each frozen group's "scale", "offset" or "both" (codes never
            change; the trained constants are written back on merge, exactly up to fp16). With r=0 only the
            constants train.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's `use_dora`): each output row of the adapted weight is
            rescaled to a trained magnitude, W' = m / ||W0 + s·B·A||_row · (W0 + s·B·A), the norm detached in
            backward. With r=0 only the magnitudes train.
        adapter_name: name of the adapter inside the model; several may coexist, one active.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    init: str = "kaiming"
    use_rslora: bool = False
    method: str = "lora"
    adapter_name: str = "default"
    bits: int = 4
    group_size: int = 32
    quantizer: str = "auto"
    pooling: str = "sum"
    train_constants: str = "none"
    use_dora: bool = False

    def __post_init__(self) -> None:
        problems = []
        constants = self.train_constants != "none"
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < (0 if constants or self.use_dora else 1):
            problems.append(
                f"r (--rank) must be a positive integer (0 only with --train-constants or --dora), got {self.r!r}"
            )
        if not isinstance(self.use_dora, bool):
            problems.append(f"use_dora (--dora) must be true or false, got {self.use_dora!r}")
        elif self.use_dora and constants:
            problems.append(
                "use_dora (--dora) rescales rows by their norm, which trained group constants would change under it: "
                "use one of --dora and --train-constants"
            )
        if self.pooling not in POOLINGS:
            problems.append(f"pooling (--pooling) must be sum or mean, got {self.pooling!r}")
        if self.train_constants not in CONSTANTS:
            problems.append(f"train_constants (--train-constants) must be one of {', '.join(CONSTANTS)}, got "
                            f"{self.train_constants!r}")  # fmt: skip
        elif constants and self.method != "qalora":
            problems.append(
                f"train_constants (--train-constants {self.train_constants}) trains an INT-k base's group "
                f"constants and needs --method qalora, not {self.method}"
            )
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha (--alpha) must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout (--dropout) must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.method not in METHODS:
            problems.append(f"method (--method) must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits not in QALORA_BITS or isinstance(self.bits, bool):
            problems.append(f"bits (--bits) must be one of {', '.join(map(str, QALORA_BITS))}, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 2 or gs & (gs - 1):
            problems.append(f"group_size (--group-size) must be a power of two >= 2, got {gs!r}")
        allowed = METHOD_QUANTIZERS.get(self.method, ())
        if self.quantizer != "auto" and allowed and self.quantizer not in allowed:
            problems.append(
                f"quantizer (--quantizer) for method {self.method} must be auto or {' or '.join(allowed)}, "
                f"got {self.quantizer!r}"
            )
        if not self.adapter_name or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.adapter_name):
            problems.append(f"adapter_name must be letters, digits, '_' or '-', got {self.adapter_name!r}")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                try:
                    re.compile(self.targets)
                except re.error as e:
                    problems.append(f"targets (--targets) is not a valid regular expression: {e}")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            problems.append(
                f"targets (--targets) must be 'all-linear', a regex or a list of names, got {self.targets!r}"
            )
        if problems:
            raise LoraqError("invalid LoRA config: " + "; ".join(problems))
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        if not isinstance(self.targets, str):
            self.targets = list(self.targets)

    @property
    def pool(self) -> int:
        """Input columns averaged before A: the group size for QA-LoRA, 1 for LoRA and QLoRA."""
        return self.group_size if self.method == "qalora" else 1

    @property
    def resolved_quantizer(self) -> str:
        """The quantizer the method uses: `quantizer`, or the method's default for "auto"."""
        return METHOD_QUANTIZERS[self.method][0] if self.quantizer == "auto" else self.quantizer

    @property
    def pool_scale(self) -> float:
        """What the pooled group sum is multiplied by before A: 1 (sum pooling) or 1/group_size (mean)."""
        return 1.0 / self.pool if self.pooling == "mean" else 1.0

    @property
    def scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)
