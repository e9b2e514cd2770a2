"""One evaluation batch: per-sample seeded randomness -> sampler -> decode -> uint8 images, with honest timings.

Sample i of a run uses seed ``seed_base + i`` for its noise (stream 0), its token-draw uniforms (stream 1) and,
with ``labels="uniform"``, its class label (stream 2) (:mod:`dd.sampling.seeds`): results do not depend on batch
size, batch composition or the number of devices, up to the float rounding of batched kernels (BLAS and convolution
algorithms are chosen per batch shape; measured on CPU: a rare pixel moves by one uint8 level).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dd.data.image_folder import model_images_to_uint8
from dd.evaluation.samplers import EvalModels, EvalSampler
from dd.pairs.generation import make_labels
from dd.sampling.seeds import per_sample_normal, per_sample_uniform, sample_seeds


@dataclass(frozen=True)
class EvalBatch:
    """indices, seeds, labels (B,) int64; images uint8 (B, H, W, 3) (NHWC, the ADM ``.npz`` layout) on the CPU;
    model_evals = #Step per image; sampling_s / decode_s = wall seconds of this batch (device synchronised)."""

    indices: torch.Tensor
    seeds: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor
    model_evals: int
    sampling_s: float
    decode_s: float


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work so wall-clock timings measure the computation, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3) on the CPU.

    Clamp, then round((x + 1) * 127.5): the same values as the official ``save_image((x + 1) / 2)`` PNGs
    (``x * 255 + 0.5`` truncated) up to exact .5 ties.
    """
    return model_images_to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu()


@torch.no_grad()
def sample_eval_batch(models: EvalModels, sampler: EvalSampler, first: int, count: int, seed_base: int,
                      labels_mode: str | Sequence[int], device: torch.device | str) -> EvalBatch:
    """Samples ``first .. first + count - 1`` of a run, decoded to uint8 images."""
    family = models.family
    seeds = sample_seeds(seed_base, first, count)
    indices = list(range(first, first + count))
    labels = make_labels(seeds, family.num_classes, labels_mode, indices)
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim), device=device)
    uniforms = per_sample_uniform(seeds, family.sequence_length, device=device)
    synchronize(device)
    start = time.perf_counter()
    out = sampler.sample(models, labels.to(device), noise, uniforms)
    synchronize(device)
    sampled = time.perf_counter()
    images = family.decode(out.sequence)
    synchronize(device)
    decoded = time.perf_counter()
    return EvalBatch(torch.tensor(indices, dtype=torch.long), torch.tensor(seeds, dtype=torch.long), labels.cpu(),
                     to_uint8_nhwc(images), int(out.model_evals), sampled - start, decoded - sampled)
