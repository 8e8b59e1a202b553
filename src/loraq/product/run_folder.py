"""A run folder, typed: the one place that writes and reads what `train` leaves behind.

    config.json         the TrainConfig (every option), read back as a TrainConfig
    data.json           what the data came to: examples trained and validated on, truncated, dropped
    calibration.json    the token ids GPTQ calibrated on (so a merge or eval rebuilds the very same base)
    metrics.jsonl, tensorboard/, checkpoints/, adapter/, loss.png, summary.json

train, resume, merge/export, eval and compare all go through `RunFolder`; none reads config.json itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import LoraqError
from .train_config import TrainConfig

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class DataRecord:
    """What the run's data came to after encoding (written once, before the first step)."""

    train_examples: int
    val_examples: int
    truncated: int
    dropped: int
    calibration_examples: int = 0


class RunFolder:
    """The files of one training run under `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    data_path = property(lambda self: self.path / "data.json")
    calibration_path = property(lambda self: self.path / "calibration.json")
    adapter_dir = property(lambda self: self.path / "adapter")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")

    @property
    def started(self) -> bool:
        return self.config_path.is_file()

    @property
    def finished(self) -> bool:
        return self.adapter_dir.exists()

    # --- config.json -------------------------------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config.to_dict(), indent=2) + "\n")

    def read_config(self) -> TrainConfig:
        """The run's options as a TrainConfig (runs written by older loraq versions included).

        Raises:
            LoraqError: config.json is missing, unreadable or holds options loraq does not know.
        """
        raw = self._read_json(self.config_path, "the run's config")
        known = {f.name for f in fields(TrainConfig) if f.init}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LoraqError(f"{self.config_path}: unknown options {unknown}; was it written by a newer loraq?")
        if "pooling" not in raw:  # before v0.2: every run saved the qalora quantizer default, QA-LoRA mean-pooled
            if raw.get("method", "lora") != "qalora" and raw.get("quantizer") == "rtn":
                raw["quantizer"] = "auto"
            raw["pooling"] = "mean" if raw.get("method") == "qalora" else "sum"
        try:
            return TrainConfig(**raw)
        except LoraqError as e:
            raise LoraqError(f"{self.config_path}: {e}") from None
        except TypeError as e:
            raise LoraqError(f"{self.config_path}: not a run config ({e})") from None

    # --- data.json and calibration.json ------------------------------------------------------------------
    def write_data(self, record: DataRecord, calibration: list[dict] | None = None) -> None:
        atomic_write_text(self.data_path, json.dumps(asdict(record), indent=2) + "\n")
        if calibration:
            ids = [item["input_ids"] for item in calibration]
            atomic_write_text(self.calibration_path, json.dumps({"input_ids": ids}) + "\n")

    def read_data(self) -> DataRecord | None:
        """What the data came to (None for runs written before data.json existed)."""
        if not self.data_path.is_file():
            return None
        raw = self._read_json(self.data_path, "the run's data record")
        try:
            return DataRecord(**raw)
        except TypeError as e:
            raise LoraqError(f"{self.data_path}: not a data record ({e})") from None

    def read_calibration(self) -> list[dict] | None:
        """The encoded examples GPTQ calibrated on (None: the run recorded none)."""
        if not self.calibration_path.is_file():
            return None
        raw = self._read_json(self.calibration_path, "the calibration examples")
        ids = raw.get("input_ids")
        if not isinstance(ids, list) or not all(isinstance(x, list) and x for x in ids):
            raise LoraqError(f"{self.calibration_path}: expected {{'input_ids': [[token ids], ...]}}")
        return [{"input_ids": x, "labels": x} for x in ids]

    # --- summary.json ------------------------------------------------------------------------------------
    def read_summary(self) -> dict:
        return self._read_json(self.summary_path, "the run's summary")

    def _read_json(self, path: Path, what: str) -> dict:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraqError(f"{path}: missing ({what}); is {self.path} a run folder?") from None
        except (OSError, ValueError) as e:
            raise LoraqError(f"{path}: cannot read {what} ({e})") from None
        if not isinstance(raw, dict):
            raise LoraqError(f"{path}: {what} must be a JSON object")
        return raw


def resolve_run(run_or_adapter: str | os.PathLike) -> tuple[Path, RunFolder | None]:
    """The adapter folder of a run folder or a bare adapter folder, and the run (None for a bare adapter).

    Raises:
        LoraqError: the path is neither.
    """
    path = Path(run_or_adapter)
    run = RunFolder(path)
    if (run.adapter_dir / ADAPTER_CONFIG).is_file():
        return run.adapter_dir, run
    if (path / ADAPTER_CONFIG).is_file():
        return path, None
    raise LoraqError(f"{path}: neither a run folder (with adapter/) nor an adapter folder (with {ADAPTER_CONFIG})")
