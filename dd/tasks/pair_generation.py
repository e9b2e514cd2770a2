"""Lightning task for pair generation: ``Trainer.predict`` over shard indices plus a shard-writing callback.

Each predict "batch" is one shard (a fixed sample range); ranks take pending shards round-robin, so the set of
files written is the same for any number of devices. The writer finalises the manifest on rank 0 after a barrier.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from dd.flow import FlowMapConfig
from dd.models.protocol import ARFamily
from dd.pairs.generation import PairBatch, generate_pair_batch, make_labels
from dd.pairs.shards import (
    MANIFEST,
    file_sha256,
    read_manifest,
    shard_is_complete,
    shard_path,
    shard_ranges,
    write_manifest,
    write_shard,
)
from dd.progress import Progress, progress_bar
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import sample_seeds


# Each predict batch is a whole shard given by its index, so Lightning has no per-sample indices to track.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


def pending_shards(directory: Path, num_pairs: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(index, first_sample, count) of every shard not yet complete on disk: missing, unreadable, holding other
    samples, or (once a finished run recorded its checksum) changed since, e.g. a corrupted file that still loads,
    which is regenerated instead of having its new bytes recorded as the shard's checksum."""
    manifest_file = Path(directory) / MANIFEST
    recorded = {}
    if manifest_file.is_file():
        recorded = {int(e["index"]): e.get("sha256") for e in read_manifest(directory).get("shards", [])}
    pending = []
    for i, (first, count) in enumerate(shard_ranges(num_pairs, shard_size)):
        path = shard_path(directory, i)
        if not shard_is_complete(path, first, count):
            pending.append((i, first, count))
        elif recorded.get(i) and file_sha256(path) != recorded[i]:
            warnings.warn(f"{path} differs from the checksum its generation recorded: regenerating it", stacklevel=2)
            pending.append((i, first, count))
    return pending


#: the placeholder item of a rank left without a shard (see PairGenerationTask.predict_dataloader)
NO_SHARD = (-1, 0, 0)


class _ShardList(Dataset):
    def __init__(self, shards: Sequence[tuple[int, int, int]]) -> None:
        self.shards = list(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        return self.shards[i]


class PairGenerationTask(L.LightningModule):
    """Generates the pairs of one shard per predict step, in micro-batches of ``batch_size``."""

    def __init__(self, family: ARFamily, sampling: SamplingConfig, flow: FlowMapConfig, seed_base: int,
                 labels: str | Sequence[int], batch_size: int, shards: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()
        self.family = family
        self.teacher = family.teacher  # registered so Lightning moves it to the device
        self.tokenizer = family.tokenizer
        self.sampling, self.flow = sampling, flow
        self.seed_base, self.labels_mode, self.batch_size = seed_base, labels, batch_size
        self.shards = list(shards)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        # a rank with no shard (fewer pending shards than ranks) still runs one empty step: Lightning skips the
        # predict loop of an empty dataloader, hooks included, and that rank would never reach the writers' barrier
        mine = self.shards[rank::world] or [NO_SHARD]
        return DataLoader(_ShardList(mine), batch_size=None, shuffle=False)

    def predict_step(self, shard: tuple[int, int, int], batch_idx: int = 0) -> dict[str, Any] | None:
        index, first, count = (int(v) for v in shard)
        if index < 0:
            return None
        parts = []
        for start in range(first, first + count, self.batch_size):
            n = min(self.batch_size, first + count - start)
            seeds = sample_seeds(self.seed_base, start, n)
            labels = make_labels(seeds, self.family.num_classes, self.labels_mode, range(start, start + n))
            parts.append(generate_pair_batch(self.family, seeds, labels, self.sampling, self.flow, self.device))
        merged = PairBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in PairBatch.__dataclass_fields__))
        return {"index": index, "first": first, "batch": merged}


class ShardWriter(BasePredictionWriter):
    """Writes each predicted shard atomically and, at the end, the completed manifest (rank 0)."""

    def __init__(self, directory: Path, token_shape: Sequence[int], store_noise: bool,
                 shards: Sequence[tuple[int, int, int]], finalize: Callable[[Path], None]) -> None:
        super().__init__(write_interval="batch")
        self.directory = Path(directory)
        self.token_shape = tuple(token_shape)
        self.store_noise = store_noise
        self.shards = list(shards)
        self.finalize = finalize
        self.bar: Progress | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_pairs = sum(count for _, _, count in self.shards[::trainer.world_size])
            self.bar = progress_bar(rank_zero_pairs, f"pairs (rank 0 of {trainer.world_size})", "pair")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if prediction is None:  # NO_SHARD
            return
        write_shard(self.directory, prediction["index"], prediction["first"], prediction["batch"], self.token_shape,
                    self.store_noise)
        if self.bar is not None:
            self.bar.update(int(prediction["batch"].labels.shape[0]))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
        trainer.strategy.barrier("pairs-written")
        if trainer.is_global_zero:
            self.finalize(self.directory)


def finalize_manifest(directory: Path, num_pairs: int, shard_size: int) -> dict[str, Any]:
    """Scan the shards, record their checksums and mark the manifest complete when every shard is present."""
    manifest = read_manifest(directory)
    entries = []
    for i, (first, count) in enumerate(shard_ranges(num_pairs, shard_size)):
        path = shard_path(directory, i)
        if shard_is_complete(path, first, count):
            entries.append({"index": i, "file": path.name, "first_sample": first, "count": count,
                            "sha256": file_sha256(path)})
    manifest["shards"] = entries
    manifest["num_written"] = sum(e["count"] for e in entries)
    manifest["complete"] = manifest["num_written"] == num_pairs
    write_manifest(directory, manifest)
    return manifest
