"""Teacher logit processing: classifier-free guidance, temperature, top-k and top-p.

These functions define *the* teacher distribution. The AR sampler and the flow-matching map both consume
``processed_log_probs`` so the pairs follow exactly the distribution the teacher samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the teacher turns logits into a distribution over the codebook.

    cfg_scale: guidance scale s; s > 1 doubles the batch (cond rows first, then null-class rows) and uses
        ``uncond + s * (cond - uncond)``. LlamaGen: constant over positions; ``cfg_interval`` > -1 switches guidance
        off after that many decode-loop iterations (the official quirk: the prefill is always guided).
    temperature: logits are divided by max(temperature, 1e-5).
    top_k: keep logits >= the k-th largest (ties survive; k clamped to V); 0 = off.
    top_p: nucleus filtering; 1.0 = off. The token crossing the threshold is kept.
    sample: multinomial draw if True, argmax otherwise.
    """

    cfg_scale: float = 1.0
    cfg_interval: float = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sample: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 disables top-p)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the official code writes it: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Return a copy of logits (..., V) with filtered entries set to -inf (never modifies the input)."""
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def processed_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature then top-k/top-p filtering, as the official ``sample``: (..., V) -> (..., V) with -inf."""
    logits = logits / max(config.temperature, 1e-5)
    if config.top_k > 0 or config.top_p < 1.0:
        logits = filter_top_k_top_p(logits, config.top_k, config.top_p)
    return logits


def processed_log_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """log p over the codebook after temperature/top-k/top-p; filtered tokens get -inf (p = 0)."""
    return torch.log_softmax(processed_logits(logits, config).float(), dim=-1)
