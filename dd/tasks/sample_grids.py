"""Sample grids of the student during training, for loggers that show images (``logger=wandb``).

After each validation run, rank 0 takes a few held-out pairs (the same ones every time, so the grids show the student
improving on fixed inputs) and logs, one image each:

* ``samples/teacher``: the pairs' own tokens decoded: what the student should reproduce from that noise;
* ``samples/1step``: the EMA student's one-step samples from the pairs' noise and labels (``t_list[:1]``);
* ``samples/<n>step``: its samples over the whole ``t_list`` (n = len(t_list), 2 for the released schedules).

Family-agnostic: only the protocol is used (``family.codebook()``, ``family.decode(tokens)`` -> images in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from dd.data.image_folder import model_images_to_uint8
from dd.models.protocol import ARFamily
from dd.sampling.dd_samplers import fewstep_sample
from dd.tasks.loggers import image_loggers


def tile(images: torch.Tensor, per_row: int) -> np.ndarray:
    """uint8 (B, 3, H, W) -> one uint8 (rows * H, per_row * W, 3) image, row-major, black where a row is short."""
    count, _, height, width = images.shape
    rows = -(-count // per_row)
    canvas = torch.zeros(3, rows * height, per_row * width, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, per_row)
        canvas[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return canvas.permute(1, 2, 0).numpy()


class StudentSampleGrids(L.Callback):
    """Logs decoded samples of the EMA student (``pl_module.ema.shadow``) at the end of every validation run to the
    loggers that take images; does nothing (not even the sampling) when there are none, e.g. with ``logger=csv``.

    ``pairs`` is the held-out pair dataset (items with ``label``, ``indices``, ``noise``); the first ``num_images`` of
    it are used. ``t_list`` / ``split_t``: the training schedule."""

    def __init__(self, family: ARFamily, pairs: Dataset, t_list: Sequence[int], split_t: int, num_images: int = 8,
                 per_row: int = 8) -> None:
        super().__init__()
        self.family, self.pairs = family, pairs
        self.t_list, self.split_t = tuple(int(t) for t in t_list), int(split_t)
        self.num_images, self.per_row = num_images, per_row

    def _batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        count = min(self.num_images, len(self.pairs))
        batch = default_collate([self.pairs[i] for i in range(count)])
        return {key: value.to(device) for key, value in batch.items()}

    def schedules(self) -> dict[str, tuple[int, ...]]:
        """Logged key -> t_list of each student sampler (one entry when t_list has a single timestep)."""
        return {"samples/1step": self.t_list[:1], f"samples/{len(self.t_list)}step": self.t_list}

    @torch.no_grad()
    def grids(self, student: torch.nn.Module, device: torch.device) -> dict[str, tuple[np.ndarray, list[int]]]:
        """Logged key -> (tiled uint8 image, labels in tile order)."""
        batch = self._batch(device)
        self.family.tokenizer.to(device)  # decoding runs where the student is
        sequences = {"samples/teacher": self.family.codebook().to(device)[batch["indices"]]}
        for key, t_list in self.schedules().items():
            sequences[key] = fewstep_sample(student, batch["label"], batch["noise"], t_list, self.split_t).sequence
        labels = batch["label"].tolist()
        return {key: (tile(model_images_to_uint8(self.family.decode(seq)).cpu(), self.per_row), labels)
                for key, seq in sequences.items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = image_loggers(trainer.loggers)
        if not targets or not trainer.is_global_zero or trainer.sanity_checking or self.num_images < 1:
            return
        student = pl_module.ema.shadow
        was_training = student.training
        student.eval()
        try:
            grids = self.grids(student, pl_module.device)
        finally:
            student.train(was_training)
        for logger in targets:
            for key, (image, labels) in grids.items():
                logger.log_image(key=key, images=[image], step=trainer.global_step,
                                 caption=[f"labels {' '.join(map(str, labels))}"])
