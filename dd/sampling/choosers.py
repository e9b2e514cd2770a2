"""Token choosers: how an AR loop turns a processed distribution into the next token.

A chooser is called as ``chooser(log_probs, position)`` with ``log_probs`` (B, V) (float, -inf for filtered
tokens) and the index of the token being chosen (0-based within the image sequence, or within a flat scale slice
for multi-scale models); it returns (B,) int64 ids. Pair generation plugs the flow-matching map in here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenChooser(Protocol):
    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor: ...


def greedy_chooser(log_probs: torch.Tensor, position: int) -> torch.Tensor:
    """Argmax (the official ``sample_logits=False``)."""
    return torch.topk(log_probs, k=1, dim=-1).indices[:, 0]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categorical draw by inverse CDF: probs (B, V) >= 0, uniforms (B,) in (0, 1] -> (B,) ids.

    Zero-probability tokens are never selected (their CDF step is empty).
    """
    cdf = probs.double().cumsum(dim=-1)
    threshold = uniforms.double().to(cdf.device)[:, None] * cdf[:, -1:]
    index = (cdf < threshold).sum(dim=-1)
    return index.clamp_(max=probs.shape[-1] - 1)


class SeededMultinomialChooser:
    """Multinomial sampling with pre-drawn per-sample uniforms (B, num_positions): batch-size independent."""

    def __init__(self, uniforms: torch.Tensor) -> None:
        self.uniforms = uniforms

    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor:
        return inverse_cdf(log_probs.float().exp(), self.uniforms[:, position])


def global_multinomial_chooser(log_probs: torch.Tensor, position: int) -> torch.Tensor:
    """``torch.multinomial(probs, 1)`` on the global generator: the official draw sequence (bit parity only)."""
    return torch.multinomial(torch.softmax(log_probs, dim=-1), num_samples=1)[:, 0]
