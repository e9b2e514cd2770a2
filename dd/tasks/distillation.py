"""Lightning task for DD student training: a thin wrapper around ``dd.distill`` (loss, EMA) and the pair dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dd.distill.ema import EMA
from dd.distill.losses import LossConfig, dd_loss, sample_timesteps
from dd.lr import DECAY_SHAPES, check_final_ratio, decayed
from dd.sampling.dd_samplers import fewstep_sample


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine (or linear) decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in DECAY_SHAPES:  # refused when the task is built, before any training
            raise ValueError(f"optim.decay={self.decay!r}: expected one of {', '.join(DECAY_SHAPES)}")
        check_final_ratio(self.min_lr_ratio, "optim.min_lr_ratio")


def lr_lambda(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``step``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(config.warmup_steps, 1)
        progress = (step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1)
        return decayed(progress, config.min_lr_ratio, config.decay)

    return factor


class StepIndexedBatchSampler(Sampler[list[int]]):
    """Batches as a pure function of the global batch counter, so a resumed run sees exactly the data an
    uninterrupted one would (Lightning restarts a plain DataLoader from the top of the epoch).

    Batch k: epoch e = k // steps_per_epoch of a permutation seeded by (seed, e); every rank takes a strided share
    of the global batch (``batch_size`` per rank). Iteration starts at ``start_fn()`` (the restored counter).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_fn: Callable[[], int],
                 rank_fn: Callable[[], tuple[int, int]]) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_fn, self.rank_fn = start_fn, rank_fn

    def _steps_per_epoch(self, world: int) -> int:
        steps = self.num_items // (self.batch_size * world)
        if steps < 1:
            raise ValueError(f"{self.num_items} training pairs cannot fill one global batch of "
                             f"{self.batch_size} x {world} ranks")
        return steps

    def __len__(self) -> int:
        return self._steps_per_epoch(self.rank_fn()[1])

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self.rank_fn()
        per_epoch = self._steps_per_epoch(world)
        start = self.start_fn()
        epoch, position = divmod(start, per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        global_batch = self.batch_size * world
        for p in range(position, per_epoch):
            chunk = order[p * global_batch:(p + 1) * global_batch]
            yield chunk[rank::world].tolist()


class _CompiledStudent:
    """Routes ``forward`` through ``torch.compile`` and everything else to the plain student (not an nn.Module, so
    its parameters are not registered twice)."""

    def __init__(self, student: torch.nn.Module) -> None:
        self.student = student
        self.compiled = torch.compile(student)

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.student, name)


class StepIndexedData:
    """Data loaders of a distillation task (DD, DD2): training batches from :class:`StepIndexedBatchSampler` at the
    task's ``batches_seen`` counter (exact resume), validation in order. Needs ``train_data``, ``val_data``,
    ``batch_size``, ``num_workers``, ``seed``, ``batches_seen`` and a trainer."""

    def train_dataloader(self) -> DataLoader:
        sampler = StepIndexedBatchSampler(len(self.train_data), self.batch_size, self.seed,
                                          start_fn=lambda: int(self.batches_seen),
                                          rank_fn=lambda: (self.trainer.global_rank, self.trainer.world_size))
        return DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class DistillationTask(StepIndexedData, L.LightningModule):
    """Trains ``student`` on pairs. Validation reports, per t in ``t_list``, loss and token accuracy of the logits
    head at the predicted positions, and the token accuracy of 1-step and full-``t_list`` sampling."""

    def __init__(self, student: torch.nn.Module, t_list: Sequence[int], loss: LossConfig, optim: OptimConfig,
                 ema_decay: float, total_steps: int, train_data: Dataset, val_data: Dataset, batch_size: int,
                 num_workers: int = 0, perceptual: torch.nn.Module | None = None, compile: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.student = student
        self.ema = EMA(student, ema_decay)
        self.t_list = tuple(int(t) for t in t_list)
        self.t_weights = loss.timestep_weights(self.t_list)  # checks t_probs against t_list; None: uniform
        self.loss_config, self.optim_config = loss, optim
        self.total_steps = total_steps
        self.train_data, self.val_data = train_data, val_data
        self.batch_size, self.num_workers = batch_size, num_workers
        self.perceptual = perceptual
        self.seed = seed
        # with compile=true the loss calls the compiled forward; perturb() stays the plain student's
        self._compiled = _CompiledStudent(student) if compile else None
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    # -- training -----------------------------------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor], t: torch.Tensor, model: torch.nn.Module):
        return dd_loss(model, batch["label"], batch["indices"], batch["noise"], t, self.student.codebook,
                       self.loss_config, self.perceptual)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + int(self.batches_seen)) * 101 + rank)
        # counted here (not in on_train_batch_end, which runs after checkpoint callbacks) so a checkpoint taken
        # at the end of this step records that this batch was consumed
        self.batches_seen += 1
        t = sample_timesteps(self.t_list, batch["label"].shape[0], generator,
                             self.t_weights).to(self.device)
        terms = self._loss(batch, t, self._student_for_training())
        self.log_dict({"train/loss": terms.total, "train/ce": terms.ce, "train/mse": terms.mse,
                       "train/perceptual": terms.perceptual, "train/token_acc": terms.token_acc},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["label"].shape[0])
        return terms.total

    def _student_for_training(self) -> torch.nn.Module:
        return self._compiled if self._compiled is not None else self.student

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Optimizer step, then the EMA update (before any checkpoint callback of this step runs)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.student)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            (no_decay if param.ndim < 2 else decay).append(param)
        cfg = self.optim_config
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation (EMA weights) -------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        model = self.ema.shadow
        size = batch["label"].shape[0]
        for t_value in self.t_list:
            t = torch.full((size,), t_value, dtype=torch.long, device=self.device)
            terms = self._loss(batch, t, model)
            self.log(f"val/ce_t{t_value}", terms.ce, batch_size=size, sync_dist=True)
            self.log(f"val/token_acc_t{t_value}", terms.token_acc, batch_size=size, sync_dist=True)
        for name, t_list in (("1step", self.t_list[:1]), (f"{len(self.t_list)}step", self.t_list)):
            result = fewstep_sample(model, batch["label"], batch["noise"], t_list, self.loss_config.split_t)
            ids = model.nearest_indices(result.sequence)
            acc = (ids == batch["indices"]).float().mean()
            self.log(f"val/sample_token_acc_{name}", acc, batch_size=size, sync_dist=True, prog_bar=True)
