"""Lightning task for evaluation sampling: ``Trainer.predict`` over fixed batches of sample indices plus a writer.

Each predict "batch" is one range of ``batch_size`` sample indices; ranks take them round-robin. Per-sample seeds
make the images independent of how the ranges are spread, so 1 and N devices write identical files. The writer
stores PNGs and one part file per batch; rank 0 assembles them after a barrier (``dd.evaluation.outputs``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from dd.evaluation.batches import EvalBatch, sample_eval_batch
from dd.evaluation.outputs import write_batch
from dd.evaluation.samplers import EvalModels, EvalSampler
from dd.progress import Progress, progress_bar

warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


def batch_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """(first, count) of consecutive batches covering 0 .. num_samples - 1."""
    return [(first, min(batch_size, num_samples - first)) for first in range(0, num_samples, batch_size)]


class _Ranges(Dataset):
    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = list(ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.ranges[i]


class EvalSamplingTask(L.LightningModule):
    """Samples and decodes one range of sample indices per predict step."""

    def __init__(self, models: EvalModels, sampler: EvalSampler, seed_base: int, labels: Any,
                 ranges: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.models = models
        self.tokenizer = models.family.tokenizer  # registered so Lightning moves them to the device
        if sampler.needs_teacher:
            self.teacher = models.family.teacher
        if models.student is not None:
            self.student = models.student
        self.sampler, self.seed_base, self.labels_mode = sampler, seed_base, labels
        self.ranges = list(ranges)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(_Ranges(self.ranges[rank::world]), batch_size=None, shuffle=False)

    def predict_step(self, batch_range: tuple[int, int], batch_idx: int = 0) -> EvalBatch:
        first, count = (int(v) for v in batch_range)
        return sample_eval_batch(self.models, self.sampler, first, count, self.seed_base, self.labels_mode,
                                 self.device)


class EvalSampleWriter(BasePredictionWriter):
    """Writes PNGs and a part file for every batch as soon as it is sampled; barrier at the end."""

    def __init__(self, directory: Path, write_pngs: bool, total: int) -> None:
        super().__init__(write_interval="batch")
        self.directory, self.write_pngs, self.total = Path(directory), write_pngs, total
        self.bar: Progress | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = progress_bar(self.total, f"sampling (rank 0 of {trainer.world_size})", "img")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: EvalBatch,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        write_batch(self.directory, prediction, self.write_pngs, trainer.global_rank)
        if self.bar is not None:
            self.bar.update(len(prediction.indices) * trainer.world_size)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
        trainer.strategy.barrier("eval-samples-written")
