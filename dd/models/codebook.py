"""Codebook look-ups shared by every family: nearest-code snapping and squared distances."""

from __future__ import annotations

import torch

from dd.acceleration import full_precision


def squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """x (N, d), codebook (V, d) -> (N, V) squared Euclidean distances |x|^2 + |c|^2 - 2 x.c.

    This is the expansion the official quantisers use; it never materialises an (N, V, d) tensor. Computed in
    float32 with autocast off, so a caller's bf16 autocast (``bf16-mixed``, ``teacher_dtype``) cannot move a
    token to another code.
    """
    with full_precision(x.device.type):
        x = x.float()
        codebook = codebook.float()
        return (x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1)[None, :]) - 2.0 * (x @ codebook.t())


def nearest_code_indices(x: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2, first minimum on ties) for every vector.

    x (..., d), codebook (V, d) -> (...,) int64. Rows are processed in chunks so memory stays bounded
    at ``chunk_size * V`` floats.
    """
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, flat.shape[0], chunk_size):
        stop = start + chunk_size
        out[start:stop] = squared_distances(flat[start:stop], codebook).argmin(dim=-1)
    return out.reshape(x.shape[:-1])
