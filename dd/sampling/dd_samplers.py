"""Distilled-Decoding samplers as pure functions: few-step and teacher-involved (official loops, method.md §5).

Both re-use the *same original noise* for every still-noisy position at every step, exactly as the official
``eval_fewstep.py`` / ``sample.py`` and ``eval_combine_sample.py`` / ``combine_sample.py`` loops do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dd.models.codebook import nearest_code_indices
from dd.models.protocol import ARFamily, DDStudent
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig


@dataclass(frozen=True)
class DDStep:
    """One student evaluation: input X_t (B, L, d), final_predict outputs, assembled sequence (B, L, d)."""

    t: int
    x_t: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    sequence: torch.Tensor


@dataclass(frozen=True)
class SampleResult:
    """sequence (B, L, d) continuous tokens ready for decoding; ``model_evals`` counts student + teacher forwards
    per image (the paper's #Step)."""

    sequence: torch.Tensor
    steps: tuple[DDStep, ...]
    model_evals: int
    teacher_ids: torch.Tensor | None = None


def validate_t_list(t_list: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """t_list must start at 0, increase strictly and stay below ``num_timesteps``."""
    t_tuple = tuple(int(t) for t in t_list)
    if len(t_tuple) == 0 or t_tuple[0] != 0:
        raise ValueError(f"t_list={list(t_tuple)} must start with 0 (the all-noise step)")
    if any(b <= a for a, b in zip(t_tuple, t_tuple[1:])):
        raise ValueError(f"t_list={list(t_tuple)} must be strictly increasing")
    if t_tuple[-1] >= num_timesteps:
        raise ValueError(f"t_list={list(t_tuple)}: every timestep must be < {num_timesteps} (valid: 0..{num_timesteps - 1})")
    return t_tuple


def validate_split(split: int, num_timesteps: int) -> int:
    """split_t is a timestep (tokens for LlamaGen, scales for VAR): 0 .. num_timesteps."""
    if not 0 <= int(split) <= num_timesteps:
        raise ValueError(f"split_t={split} outside the valid range 0..{num_timesteps}")
    return int(split)


def validate_teacher_start(teacher_start_t: int, t_list: Sequence[int]) -> int:
    if len(t_list) != 2:
        raise ValueError(f"teacher-involved sampling needs exactly two timesteps, got t_list={list(t_list)}")
    if not 0 <= int(teacher_start_t) < int(t_list[1]):
        raise ValueError(f"teacher_start_t={teacher_start_t} outside the valid range 0..{int(t_list[1]) - 1} "
                         f"(the teacher must generate at least one timestep before t_list[1]={t_list[1]})")
    return int(teacher_start_t)


def dd_step(student: DDStudent, x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor, t: int,
            split: int) -> DDStep:
    """X_t = perturb(x, t, noise); (tokens, logits) = final_predict; sequence = final_sequence(split)."""
    x_t = student.perturb(x, t, noise)
    tokens, logits = student.final_predict(x_t, labels, t)
    return DDStep(t, x_t, tokens, logits, student.final_sequence(tokens, logits, split))


@torch.no_grad()
def fewstep_sample(student: DDStudent, labels: torch.Tensor, noise: torch.Tensor, t_list: Sequence[int],
                   split: int) -> SampleResult:
    """Official few-step loop: x = noise; for t in t_list: x = final_sequence(final_predict(perturb(x, t, noise)))."""
    x = noise
    steps = []
    for t in t_list:
        step = dd_step(student, x, noise, labels, int(t), split)
        steps.append(step)
        x = step.sequence
    return SampleResult(x, tuple(steps), model_evals=len(steps))


@torch.no_grad()
def teacher_involved_sample(student: DDStudent, family: ARFamily, labels: torch.Tensor, noise: torch.Tensor,
                            t_list: Sequence[int], split: int, teacher_start_t: int, sampling: SamplingConfig,
                            chooser: TokenChooser) -> SampleResult:
    """Student step at t = 0 (skipped when teacher_start_t = 0), teacher regenerates timesteps
    teacher_start_t .. t_list[1] - 1 conditioned on the snapped student prefix, then one student step at t_list[1]
    with the original noise after the teacher's tokens (skipped when t_list[1] is the end of the sequence)."""
    start = validate_teacher_start(teacher_start_t, t_list)
    second = int(t_list[1])
    steps: list[DDStep] = []
    prefix = None
    if start > 0:
        steps.append(dd_step(student, noise, noise, labels, int(t_list[0]), split))
        codebook = family.codebook()
        prefix = codebook[nearest_code_indices(steps[0].sequence, codebook)]
    teacher_ids = family.teacher_generate(labels, start, second, prefix, sampling, chooser)
    data = family.codebook()[teacher_ids].to(noise.dtype)
    x = torch.cat([data, noise[:, data.shape[1]:]], dim=1)
    evals = len(steps) + (second - start)
    if second < family.num_timesteps:
        steps.append(dd_step(student, x, noise, labels, second, split))
        x = steps[-1].sequence
        evals += 1
    return SampleResult(x, tuple(steps), model_evals=evals, teacher_ids=teacher_ids)
