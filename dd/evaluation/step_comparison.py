"""Does the second student step help? 1-step vs few-step sampling on held-out (noise, tokens) pairs, paired.

The pairs give, for the same labels and noise, the teacher's own tokens (the flow map's). Compared, with paired
statistics (the same samples and tokens under both samplers):

* token accuracy after the second timestep t2 with the true prefix given as data vs from noise alone: whether the
  student learned to use a given prefix, the property the second step relies on;
* sampled 1-step vs t_list sequences: token accuracy against the pairs after t2, and the teacher's NLL of the
  tokens after t2 given each sequence's own prefix (the teacher's guided sampling distribution, by teacher forcing).
  The second step re-predicts the tokens after t2 conditioned on the first step's own prefix; when that prefix
  differs from the pair's, its tokens follow that prefix rather than the pair, so the NLL is the fairer measure of
  what the second step buys (the pairs' own NLL is reported as the reference).

Family-agnostic: only the ``DDStudent`` and ``ARFamily`` protocols are used. ``scripts/compare_steps.py`` is the
command line; tests/test_var_bundled.py asserts the VAR result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from dd.models.protocol import ARFamily, DDStudent
from dd.sampling.dd_samplers import fewstep_sample
from dd.sampling.logits import SamplingConfig


def paired_token_z(worse: torch.Tensor, better: torch.Tensor) -> float:
    """Sign-test z of ``better`` over ``worse`` (boolean hits on the same tokens): among the tokens exactly one of
    them gets right, how far ``better``'s count exceeds half, in standard deviations (0 when they never differ)."""
    only_better = int((better & ~worse).sum())
    only_worse = int((worse & ~better).sum())
    return (only_better - only_worse) / max(only_better + only_worse, 1) ** 0.5


def paired_mean_z(differences: torch.Tensor) -> float:
    """Mean of per-sample paired differences over its standard error (0 when all differences are equal to 0)."""
    mean, spread = float(differences.mean()), float(differences.std())
    if spread == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / (spread / len(differences) ** 0.5)


@dataclass(frozen=True)
class StepComparison:
    """Accuracies are over the tokens after t2 (``rest_start`` on) unless named ``_all``; NLLs in nats per token."""

    num_samples: int
    t2: int
    rest_start: int
    acc_t0_all: float          # logits argmax at t = 0 (all noise), every position
    acc_noise: float           # t = 0 (noise only)
    acc_given: float           # t = t2 with the pair's own prefix as data
    z_given: float             # given over noise (sign test)
    acc_1step: float           # sampled 1-step sequence
    acc_2step: float           # sampled t_list sequence
    z_tokens: float            # 2-step over 1-step (sign test)
    nll_1step: float
    nll_2step: float
    nll_pairs: float           # the pairs' own tokens (reference)
    z_nll: float               # 1-step NLL minus 2-step NLL, paired per sample
    prefix_kept: bool          # the second step left the first step's tokens before t2 as they were

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def compare_steps(student: DDStudent, family: ARFamily, sampling: SamplingConfig, labels: torch.Tensor,
                  noise: torch.Tensor, ids: torch.Tensor, t_list: Sequence[int], split: int,
                  batch_size: int = 500) -> StepComparison:
    """``labels`` (B,), ``noise`` (B, L, d), ``ids`` (B, L): held-out pairs; ``t_list`` = [0, t2, ...]."""
    t_list = [int(t) for t in t_list]
    if len(t_list) < 2 or t_list[0] != 0:
        raise ValueError(f"t_list={t_list}: need [0, t2, ...] to compare 1 step with more")
    t2 = t_list[1]
    if not 0 < t2 < family.num_timesteps:
        raise ValueError(f"t_list={t_list}: t2 = {t2} leaves nothing to compare; valid: 1..{family.num_timesteps - 1}")
    if labels.shape[0] != ids.shape[0] or labels.shape[0] != noise.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"labels {tuple(labels.shape)}, noise {tuple(noise.shape)}, ids {tuple(ids.shape)}: need the "
                         f"same number (> 0) of held-out pairs")
    rest = family.data_length(t2)
    codebook = family.codebook()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("t0", "given", "one", "two", "nll1", "nll2", "nllp")}
    prefix_kept = True

    def nll(lab: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        log_probs = family.teacher_log_probs(lab, seq, sampling).gather(-1, seq[..., None])[..., 0]
        return -log_probs[:, rest:].mean(1)

    for begin in range(0, len(labels), batch_size):
        lab, eps, tgt = (x[begin:begin + batch_size] for x in (labels, noise, ids))
        data = codebook[tgt].to(eps.dtype)
        sampled = fewstep_sample(student, lab, eps, t_list, split)
        first = sampled.steps[0]  # the 1-step sample; at t = 0 no data is given, so also the noise-only prediction
        parts["t0"].append(first.logits.argmax(-1) == tgt)
        _, logits = student.final_predict(student.perturb(data, t2, eps), lab, t2)
        parts["given"].append(logits.argmax(-1) == tgt)
        one = student.nearest_indices(first.sequence)
        two = student.nearest_indices(sampled.sequence)
        prefix_kept &= torch.equal(one[:, :rest], two[:, :rest])
        parts["one"].append(one == tgt)
        parts["two"].append(two == tgt)
        parts["nll1"].append(nll(lab, one))
        parts["nll2"].append(nll(lab, two))
        parts["nllp"].append(nll(lab, tgt))
    c = {k: torch.cat(v) for k, v in parts.items()}

    def mean(x: torch.Tensor) -> float:
        return float(x.float().mean())

    return StepComparison(
        num_samples=len(labels), t2=t2, rest_start=rest, acc_t0_all=mean(c["t0"]), acc_noise=mean(c["t0"][:, rest:]),
        acc_given=mean(c["given"][:, rest:]), z_given=paired_token_z(c["t0"][:, rest:], c["given"][:, rest:]),
        acc_1step=mean(c["one"][:, rest:]), acc_2step=mean(c["two"][:, rest:]),
        z_tokens=paired_token_z(c["one"][:, rest:], c["two"][:, rest:]),
        nll_1step=mean(c["nll1"]), nll_2step=mean(c["nll2"]), nll_pairs=mean(c["nllp"]),
        z_nll=paired_mean_z(c["nll1"] - c["nll2"]), prefix_kept=prefix_kept)
