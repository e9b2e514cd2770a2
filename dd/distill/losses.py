"""Distillation losses for the DD student (method.md §4.3-4.5), pure torch.

A training example is a pair (label, target token ids q (L,), noise eps (L, d)) and a timestep t drawn from the
schedule's ``t_list``. Timesteps (and ``split_t``) count AR steps: tokens for LlamaGen, scales for VAR; the student
says how many leading tokens that is (``student.num_data_tokens(t)``, written n(t) below). The student reads
X_t = [codebook[q_<n(t)], eps_>=n(t)] and must output the final sequence:
* ``ce``: cross-entropy of the logits head against q at the predicted positions (i >= n(t));
* ``mse``: squared error of the continuous head against codebook[q] at positions i >= max(n(t), n(split_t)) (the
  positions whose continuous output is used at inference), mean over positions and channels;
* ``perceptual`` (optional): a feature-space distance between images decoded through the frozen tokenizer from
  [codebook[q] before the split, continuous predictions after it] and from codebook[q].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dd.models.protocol import ARFamily


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms and the split between logits-head and continuous-head positions (a timestep)."""

    ce_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0
    split_t: int = 0
    t_probs: tuple[float, ...] | None = None  # relative probability of each t in t_list (None: see t0_weight)
    t0_weight: float = 1.0  # without t_probs: t = 0 (pure noise, the one-step branch) drawn this many times as
                            # often as each other t of t_list (1: uniform); adapts to any t_list

    def __post_init__(self) -> None:
        if min(self.ce_weight, self.mse_weight, self.perceptual_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.ce_weight + self.mse_weight + self.perceptual_weight == 0:
            raise ValueError("at least one loss weight must be > 0")
        try:
            t0_weight = float(self.t0_weight)
        except (TypeError, ValueError):
            t0_weight = float("nan")
        if not t0_weight > 0:
            raise ValueError(f"loss.t0_weight={self.t0_weight!r} must be a number > 0 (1: uniform draws; use "
                             "loss.t_probs to leave out t = 0)")
        object.__setattr__(self, "t0_weight", t0_weight)
        if self.t_probs is not None:
            object.__setattr__(self, "t_probs", tuple(float(p) for p in self.t_probs))
            if min(self.t_probs, default=-1.0) < 0 or sum(self.t_probs) <= 0:
                raise ValueError(f"loss.t_probs={list(self.t_probs)}: weights must be >= 0 with a positive sum")

    def check_t_list(self, t_list: Sequence[int]) -> None:
        """``t_probs`` needs one weight per timestep of ``t_list``."""
        if self.t_probs is not None and len(self.t_probs) != len(t_list):
            raise ValueError(f"loss.t_probs={list(self.t_probs)} needs one weight per t in t_list={list(t_list)}")

    def timestep_weights(self, t_list: Sequence[int]) -> tuple[float, ...] | None:
        """Relative probability of each t in ``t_list``: ``t_probs`` when given, else ``t0_weight`` for t = 0 and 1
        for every other t; None (uniform) when that is all ones."""
        self.check_t_list(t_list)
        if self.t_probs is not None:
            return self.t_probs
        weights = tuple(self.t0_weight if int(t) == 0 else 1.0 for t in t_list)
        return None if all(w == 1.0 for w in weights) else weights


@dataclass(frozen=True)
class LossTerms:
    """Scalar tensors; ``total`` is the weighted sum that is optimised. ``token_acc`` is a detached diagnostic."""

    total: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    token_acc: torch.Tensor


def sample_timesteps(t_list: Sequence[int], batch: int, generator: torch.Generator | None = None,
                     probs: Sequence[float] | None = None) -> torch.Tensor:
    """(batch,) int64 timesteps drawn from ``t_list`` (uniformly unless ``probs``, relative weights, is given)."""
    if probs is not None and len(probs) != len(t_list):
        raise ValueError(f"probs={list(probs)} needs one weight per t in t_list={list(t_list)}")
    weights = torch.tensor(probs if probs is not None else [1.0] * len(t_list), dtype=torch.float)
    choice = torch.multinomial(weights, batch, replacement=True, generator=generator)
    return torch.tensor(list(t_list), dtype=torch.long)[choice]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, L) over mask (B, L); 0 (with a gradient path) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def dd_loss(student: torch.nn.Module, labels: torch.Tensor, target_ids: torch.Tensor, noise: torch.Tensor,
            t: torch.Tensor, codebook: torch.Tensor, config: LossConfig,
            perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> LossTerms:
    """Loss of one batch. labels (B,), target_ids (B, L), noise (B, L, d), t (B,), codebook (V, d).

    ``perceptual(pred_tokens, target_tokens)`` (both (B, L, d)) returns a scalar when the perceptual term is on.
    """
    data = codebook[target_ids].to(noise.dtype)
    x_t = student.perturb(data, t, noise)
    tokens, logits = student(x_t, labels, t)
    positions = torch.arange(target_ids.shape[1], device=t.device)[None, :]
    given = student.num_data_tokens(t).to(t.device)
    predicted = positions >= given[:, None]
    ce_all = F.cross_entropy(logits.float().transpose(1, 2), target_ids, reduction="none")
    ce = _masked_mean(ce_all, predicted)
    split_tokens = int(student.num_data_tokens(config.split_t))
    conti_mask = positions >= torch.clamp(given, min=split_tokens)[:, None]
    mse = _masked_mean((tokens.float() - data.float()).pow(2).mean(-1), conti_mask)
    zero = ce.new_zeros(())
    percep = zero
    if config.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual loss function")
        pred = torch.where(conti_mask[..., None], tokens, data)
        percep = perceptual(pred, data)
    total = config.ce_weight * ce + config.mse_weight * mse + config.perceptual_weight * percep
    with torch.no_grad():
        acc = _masked_mean((logits.argmax(-1) == target_ids).float(), predicted)
    return LossTerms(total, ce.detach(), mse.detach(), percep.detach(), acc)


class FeaturePerceptualLoss(torch.nn.Module):
    """Perceptual loss: decode both token sequences through the frozen tokenizer, compare the features of a frozen
    network (mean squared difference of unit-normalised features, LPIPS-style).

    ``features(images in [0, 1], (B, 3, H, W)) -> (B, D)`` or a list of feature maps.
    """

    def __init__(self, family: ARFamily, features: torch.nn.Module) -> None:
        super().__init__()
        self.family = family
        # registered (and frozen) so that moving the loss (Lightning moves the task to its device) moves the
        # tokenizer that family.decode runs, and no gradient accumulates in it
        self.tokenizer = family.tokenizer.eval().requires_grad_(False)
        self.features = features.eval().requires_grad_(False)

    def _feats(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        images = (self.family.decode(tokens).clamp(-1, 1) + 1) / 2
        out = self.features(images)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, pred_tokens: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._feats(target_tokens)
        pred = self._feats(pred_tokens)
        terms = [(F.normalize(p.flatten(1), dim=1) - F.normalize(q.flatten(1), dim=1)).pow(2).sum(1).mean()
                 for p, q in zip(pred, target)]
        return torch.stack(terms).sum()
