"""The adapter configuration, validated once, up front."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from .errors import LoraqError

METHODS = ("lora", "qlora")
INITS = ("kaiming", "gaussian")


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
        method: "lora", or "qlora" (the frozen base stored as NF4 with double-quantized constants).
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

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r (--rank) must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha (--alpha) must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout (--dropout) must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.method not in METHODS:
            problems.append(f"method (--method) must be one of {', '.join(METHODS)}, got {self.method!r}")
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
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)
