"""Student snapshots during training, for quality-against-training-time curves.

With ``snapshot_every=N`` (> 0) the EMA student is exported every N optimizer steps to
``<output_dir>/export/snapshots/student_ema_step<step>.pt`` in the preset's export layout (``dd.eval
student.checkpoint=...`` reads it like the final export). Its ``.json`` sidecar records the step and ``train_s``, the
training wall time up to that step, accumulated over resumed segments (the callback's state travels in the Lightning
checkpoint), so a curve of e.g. proxy FID against ``train_s`` can be drawn afterwards (``scripts/demo.py`` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

SNAPSHOT_DIR = "snapshots"


def snapshot_path(export_dir: str | Path, step: int) -> Path:
    return Path(export_dir) / SNAPSHOT_DIR / f"student_ema_step{step:07d}.pt"


def list_snapshots(export_dir: str | Path) -> list[Path]:
    """The snapshot files of a run, by step."""
    return sorted((Path(export_dir) / SNAPSHOT_DIR).glob("student_ema_step*.pt"))


class StudentSnapshots(Callback):
    """Exports the EMA student every ``every`` steps through ``export(path, task, extra)`` (rank zero only)."""

    def __init__(self, export_dir: str | Path, every: int,
                 export: Callable[[Path, L.LightningModule, dict[str, Any]], Path]) -> None:
        if every < 0:
            raise ValueError(f"snapshot_every={every} must be >= 0 (0: no snapshots)")
        self.export_dir, self.every, self.export = Path(export_dir), int(every), export
        self.train_s = 0.0  # training wall time before the current segment (restored on resume)
        self._segment_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._segment_start = time.perf_counter()

    def elapsed(self) -> float:
        return self.train_s + (time.perf_counter() - self._segment_start if self._segment_start is not None else 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero and \
                not snapshot_path(self.export_dir, step).exists():
            self.export(snapshot_path(self.export_dir, step), pl_module,
                        {"global_step": step, "train_s": round(self.elapsed(), 3)})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_s, self._segment_start = self.elapsed(), None

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_s = float(state_dict.get("train_s", 0.0))
