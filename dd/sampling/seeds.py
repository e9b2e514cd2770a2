"""Per-sample seeded randomness: sample i of a run draws only from generators seeded by ``seed_base + i``.

Results therefore do not depend on batch size, batch composition or the number of devices. All draws happen on a
CPU ``torch.Generator`` (bit-exact and cheap to regenerate) and are moved to the target device afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NOISE_STREAM = 0
TOKEN_STREAM = 1
LABEL_STREAM = 2
_GOLDEN = 0x9E3779B97F4A7C15


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for an independent stream of one sample; stream 0 is the sample seed itself."""
    return (int(seed) + stream * _GOLDEN) % (2**63)


def sample_seeds(seed_base: int, start: int, count: int) -> list[int]:
    """Seeds of samples start .. start + count - 1 of a run."""
    return [seed_base + i for i in range(start, start + count)]


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def per_sample_normal(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None,
                      stream: int = NOISE_STREAM) -> torch.Tensor:
    """(B, *shape) float32 standard normal; row b depends only on seeds[b]."""
    rows = [torch.randn(tuple(shape), generator=_generator(s, stream)) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.empty(0, *shape, device=device)


def per_sample_uniform(seeds: Sequence[int], count: int, device: torch.device | str | None = None,
                       stream: int = TOKEN_STREAM) -> torch.Tensor:
    """(B, count) float64 uniforms in (0, 1]; row b depends only on seeds[b]."""
    rows = [1.0 - torch.rand(count, generator=_generator(s, stream), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.empty(0, count, dtype=torch.float64, device=device)


def per_sample_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """(B,) int64 uniform class labels; row b depends only on seeds[b]."""
    labels = [int(torch.randint(num_classes, (1,), generator=_generator(s, LABEL_STREAM))) for s in seeds]
    return torch.tensor(labels, dtype=torch.long)
