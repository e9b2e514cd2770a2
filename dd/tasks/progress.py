"""Lightning's training progress for output that is not a terminal: summary lines instead of a redrawn bar.

On a terminal Lightning keeps its own tqdm bar. Otherwise :class:`LineProgressBar` takes its place (Lightning uses a
``ProgressBar`` found among the callbacks instead of its default) and writes, on rank 0,

* a line every ``interval_s`` seconds or tenth of ``max_steps``: step, steps/s, elapsed, ETA and the metrics the
  task logs to the progress bar (the training loss), through :class:`dd.progress.LineProgress`;
* one line after each validation run with its metrics.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar

from dd.progress import DEFAULT_INTERVAL_S, LineProgress, is_terminal


def training_progress_callbacks(trainer_cfg: dict[str, Any], stream: TextIO | None = None) -> list[ProgressBar]:
    """``[LineProgressBar()]`` when the output is not a terminal and the bar is enabled, else ``[]`` (Lightning's
    default bar, or none with ``trainer.enable_progress_bar=false``)."""
    if not trainer_cfg.get("enable_progress_bar", True) or is_terminal(stream):
        return []
    return [LineProgressBar(stream=stream)]


class LineProgressBar(ProgressBar):
    """Periodic one-line training summaries and one line per validation run (rank 0 only)."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__()
        self.stream, self.interval_s = stream, interval_s
        self.enabled = True
        self.line: LineProgress | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def _active(self) -> bool:
        return self.enabled and self.trainer.is_global_zero

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            total = trainer.max_steps if trainer.max_steps > 0 else None
            # a resumed run starts at its checkpoint's step; the rate counts only the steps of this run
            self.line = LineProgress(total, "train", "step", stream=self._out(), interval_s=self.interval_s,
                                     initial=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: with gradient accumulation several batches make one step
        if self.line is not None and trainer.global_step > self.line.n:
            metrics = self.get_metrics(trainer, pl_module)  # validation metrics get a line of their own
            self.line.postfix = _metrics_text({k: v for k, v in metrics.items()
                                               if k != "v_num" and not k.startswith("val")})
            self.line.update(trainer.global_step - self.line.n)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and not trainer.sanity_checking:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            print(f"validation at step {trainer.global_step}: {_metrics_text(metrics)}", file=self._out(),
                  flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.line is not None:
            self.line.close()
            self.line = None


def _metrics_text(metrics: dict[str, Any]) -> str:
    """``name value`` pairs, numbers with 4 significant digits, sorted by name."""
    parts = []
    for name in sorted(metrics):
        value = metrics[name]
        value = value.item() if hasattr(value, "item") else value
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)
