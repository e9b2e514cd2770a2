"""Token choosers: how an AR loop turns a processed distribution into the next token(s).

A chooser is called as ``chooser(log_probs, position)``:

* ``log_probs`` (B, V) for one token (LlamaGen: one token per step) or (B, n, V) for n tokens chosen together
  (VAR: every token of a scale at once); float, -inf for filtered tokens;
* ``position``: the flat index (within the image's token sequence) of the first token being chosen.

It returns (B,) or (B, n) int64 ids. Pair generation plugs the flow-matching map in here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenChooser(Protocol):
    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor: ...


def token_positions(log_probs: torch.Tensor, position: int) -> slice | int:
    """Index into per-position tables (B, L, ...) for the tokens a chooser call covers."""
    return position if log_probs.ndim == 2 else slice(position, position + log_probs.shape[1])


def greedy_chooser(log_probs: torch.Tensor, position: int) -> torch.Tensor:
    """Argmax (the official ``sample_logits=False`` / top-k 1)."""
    return torch.topk(log_probs, k=1, dim=-1).indices[..., 0]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categorical draw by inverse CDF: probs (..., V) >= 0, uniforms (...) in (0, 1] -> (...) ids.

    Zero-probability tokens are never selected (their CDF step is empty).
    """
    cdf = probs.double().cumsum(dim=-1)
    threshold = uniforms.double().to(cdf.device)[..., None] * cdf[..., -1:]
    index = (cdf < threshold).sum(dim=-1)
    return index.clamp_(max=probs.shape[-1] - 1)


class SeededMultinomialChooser:
    """Multinomial sampling with pre-drawn per-sample uniforms (B, num_positions): batch-size independent."""

    def __init__(self, uniforms: torch.Tensor) -> None:
        self.uniforms = uniforms

    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor:
        return inverse_cdf(log_probs.float().exp(), self.uniforms[:, token_positions(log_probs, position)])


def _multinomial_rows(log_probs: torch.Tensor, generator: torch.Generator | None, replacement: bool) -> torch.Tensor:
    """One ``torch.multinomial`` call over all rows in (batch, position) order, as the official samplers draw.

    ``replacement`` matters even for one sample: torch draws with and without replacement by different methods."""
    probs = torch.softmax(log_probs, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, num_samples=1, replacement=replacement, generator=generator)
    return ids.reshape(probs.shape[:-1])


def global_multinomial_chooser(log_probs: torch.Tensor, position: int) -> torch.Tensor:
    """LlamaGen's ``torch.multinomial(probs, 1)`` on the global generator: the official draw sequence (bit parity
    only)."""
    return _multinomial_rows(log_probs, None, replacement=False)


class GeneratorMultinomialChooser:
    """VAR's draw: ``torch.multinomial(..., replacement=True, generator=g)`` once per scale over (batch, position)
    rows. ``generator=None`` is the global generator (``intermediate_sample``); ``autoregressive_infer_cfg`` with
    ``g_seed`` uses the model's own generator seeded with it (bit parity only)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor:
        return _multinomial_rows(log_probs, self.generator, replacement=True)
