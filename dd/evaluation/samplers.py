"""The three evaluation samplers behind one interface: the teacher's own AR sampling, DD few-step sampling and
DD teacher-involved sampling (method.md §5.1-5.2; architectures.md §7.1-7.2).

Each sampler is a frozen settings object built from ``configs/sampler/<name>.yaml`` (its ``_target_``). It can
``validate`` its settings against the sequence layout *before* any model is loaded, knows its step count
(``steps``, the paper's #Step = model evaluations per image) and samples a batch from per-sample randomness::

    sampler.validate(num_timesteps=256, sequence_length=256)     # ValueError naming the valid range
    out = sampler.sample(models, labels, noise, uniforms)        # noise (B, L, d), uniforms (B, L)
    images = models.family.decode(out.sequence)                  # (B, 3, H, W) in about [-1, 1]

The DD samplers are thin adapters over the pure functions in :mod:`dd.sampling.dd_samplers`; the teacher sampler
calls ``family.teacher_generate`` over the whole sequence. Token draws use ``uniforms[b, position]`` (inverse CDF,
:class:`~dd.sampling.choosers.SeededMultinomialChooser`), so every sample depends only on its own seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from dd.models.protocol import ARFamily, DDStudent
from dd.sampling.choosers import SeededMultinomialChooser, TokenChooser, greedy_chooser
from dd.sampling.dd_samplers import (
    fewstep_sample,
    teacher_involved_sample,
    validate_split,
    validate_t_list,
    validate_teacher_start,
)
from dd.sampling.logits import SamplingConfig


@dataclass(frozen=True)
class EvalModels:
    """What a sampler may use: the family (tokenizer + teacher) and, for DD samplers, the student."""

    family: ARFamily
    student: DDStudent | None = None


@dataclass(frozen=True)
class SamplerOutput:
    """sequence (B, L, d) continuous tokens ready for ``family.decode``; ``model_evals`` = #Step per image."""

    sequence: torch.Tensor
    model_evals: int


def _sampling(value: SamplingConfig | Mapping[str, Any] | None) -> SamplingConfig:
    if isinstance(value, SamplingConfig):
        return value
    return SamplingConfig(**dict(value or {}))


def token_chooser(sampling: SamplingConfig, uniforms: torch.Tensor) -> TokenChooser:
    """Seeded multinomial draws from ``uniforms`` (B, L), or argmax when ``sampling.sample`` is False."""
    return SeededMultinomialChooser(uniforms) if sampling.sample else greedy_chooser


@dataclass(frozen=True)
class TeacherSampler:
    """The teacher's own AR sampling (static KV cache, CFG) with ``sampling`` = the preset's ``model.sampling``."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    name: str = "teacher"
    kind: ClassVar[str] = "teacher"
    needs_student: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", _sampling(self.sampling))

    def validate(self, num_timesteps: int, sequence_length: int) -> None:
        """Nothing depends on the layout: the teacher generates all ``num_timesteps`` timesteps."""

    def steps(self, num_timesteps: int) -> int:
        return int(num_timesteps)

    def sample(self, models: EvalModels, labels: torch.Tensor, noise: torch.Tensor,
               uniforms: torch.Tensor) -> SamplerOutput:
        family = models.family
        chooser = token_chooser(self.sampling, uniforms)
        ids = family.teacher_generate(labels, 0, family.num_timesteps, None, self.sampling, chooser)
        return SamplerOutput(family.codebook()[ids].to(noise.dtype), family.num_timesteps)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "sampling": asdict(self.sampling)}


@dataclass(frozen=True)
class FewStepSampler:
    """DD few-step sampling: one student evaluation per entry of ``t_list`` (t_list [0] = one step)."""

    t_list: Sequence[int] = (0,)
    split_t: int = 0
    name: str = "fewstep"
    kind: ClassVar[str] = "fewstep"
    needs_student: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_list", tuple(int(t) for t in self.t_list))

    def validate(self, num_timesteps: int, sequence_length: int) -> None:
        validate_t_list(self.t_list, num_timesteps)
        validate_split(self.split_t, num_timesteps)

    def steps(self, num_timesteps: int) -> int:
        return len(self.t_list)

    def sample(self, models: EvalModels, labels: torch.Tensor, noise: torch.Tensor,
               uniforms: torch.Tensor) -> SamplerOutput:
        result = fewstep_sample(models.student, labels, noise, self.t_list, self.split_t)
        return SamplerOutput(result.sequence, result.model_evals)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "t_list": list(self.t_list), "split_t": self.split_t}


@dataclass(frozen=True)
class TeacherInvolvedSampler:
    """DD teacher-involved sampling ("pre-trained-n-m" with n = teacher_start_t + 1, m = t_list[1] + 1): a student
    step at t = 0 (skipped when teacher_start_t = 0), the teacher regenerates timesteps teacher_start_t ..
    t_list[1] - 1 with ``sampling``, then a student step at t_list[1]. #Step = [s > 0] + (t_list[1] - s) + 1."""

    t_list: Sequence[int] = (0,)
    split_t: int = 0
    teacher_start_t: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    name: str = "teacher_involved"
    kind: ClassVar[str] = "teacher_involved"
    needs_student: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_list", tuple(int(t) for t in self.t_list))
        object.__setattr__(self, "teacher_start_t", int(self.teacher_start_t))
        object.__setattr__(self, "sampling", _sampling(self.sampling))

    def validate(self, num_timesteps: int, sequence_length: int) -> None:
        validate_t_list(self.t_list, num_timesteps)
        validate_split(self.split_t, num_timesteps)
        if len(self.t_list) != 2:
            validate_teacher_start(self.teacher_start_t, self.t_list)  # raises: exactly two timesteps needed
        second = self.t_list[1]
        if not 0 <= self.teacher_start_t < second:
            # teacher_start_t = t_list[1] would leave the teacher nothing to generate (two-step DD: sampler=fewstep)
            raise ValueError(f"teacher_start_t={self.teacher_start_t} outside the valid range 0..{second - 1}: the "
                             f"teacher regenerates timesteps teacher_start_t .. t_list[1]-1, so teacher_start_t must "
                             f"lie below the second timestep t_list[1]={second} (t_list={list(self.t_list)})")
        validate_teacher_start(self.teacher_start_t, self.t_list)

    def steps(self, num_timesteps: int) -> int:
        second = self.t_list[1]
        final = 1 if second < num_timesteps else 0
        return int(self.teacher_start_t > 0) + (second - self.teacher_start_t) + final

    def sample(self, models: EvalModels, labels: torch.Tensor, noise: torch.Tensor,
               uniforms: torch.Tensor) -> SamplerOutput:
        chooser = token_chooser(self.sampling, uniforms)
        result = teacher_involved_sample(models.student, models.family, labels, noise, self.t_list, self.split_t,
                                         self.teacher_start_t, self.sampling, chooser)
        return SamplerOutput(result.sequence, result.model_evals)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "t_list": list(self.t_list), "split_t": self.split_t,
                "teacher_start_t": self.teacher_start_t, "sampling": asdict(self.sampling)}


EvalSampler = TeacherSampler | FewStepSampler | TeacherInvolvedSampler
