"""``LlamaGenSpec``: one model preset (tokenizer + teacher + student), as the YAML in ``configs/model/`` describes it.

The YAML is the only size table. A spec builds and loads models on demand; nothing is allocated at construction.
``bundled://<file>`` checkpoint references resolve to weights shipped inside the ``dd`` package (``dd/assets``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dd.models.llamagen.builders import build_student, build_teacher, build_tokenizer, load_weights
from dd.models.llamagen.family import LlamaGenFamily
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.student import LlamaGenDDStudent
from dd.models.llamagen.tokenizer import VQTokenizer
from dd.models.presets import (  # noqa: F401  (re-exported: scripts and tests import them from here)
    with_local_weights,
    ASSETS_DIR,
    BUNDLED_PREFIX,
    RANDOM_PREFIX,
    ComponentSpec,
    component_from_config,
    load_component,
    random_weights,
    resolve_bundled,
)
from dd.sampling.logits import SamplingConfig


@dataclass(frozen=True)
class LlamaGenSpec:
    """A LlamaGen preset. ``student.arch`` holds only the student-specific fields (``codebook_dim``); the rest is
    the teacher's shape. ``sampling`` is the teacher's default sampling configuration for this preset."""

    name: str
    tokenizer: ComponentSpec
    teacher: ComponentSpec
    student: ComponentSpec
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    image_size: int = 256
    family: str = "llamagen"
    default_t_list: tuple[int, ...] = (0,)
    default_split_t: int = 0

    @property
    def student_arch(self) -> dict[str, Any]:
        return {**self.teacher.arch, **self.student.arch}

    def build_tokenizer(self, load: bool = True, device: str | torch.device = "cpu") -> VQTokenizer:
        spec = with_local_weights(self, ("tokenizer",)) if load else self
        model = build_tokenizer(**self.tokenizer.arch)
        if load:
            spec._load(model, spec.tokenizer, "tokenizer")
        return model.to(device).eval()

    def build_teacher(self, load: bool = True, device: str | torch.device = "cpu") -> LlamaGenGPT:
        spec = with_local_weights(self, ("teacher",)) if load else self
        model = build_teacher(**self.teacher.arch)
        if load:
            spec._load(model, spec.teacher, "teacher")
        return model.to(device).eval()

    def meta_models(self) -> tuple[VQTokenizer, LlamaGenGPT, LlamaGenDDStudent]:
        """Tokenizer, teacher and student on the meta device (shapes and parameter counts, no memory)."""
        return (build_tokenizer(device="meta", **self.tokenizer.arch), build_teacher(device="meta", **self.teacher.arch),
                build_student(device="meta", **self.student_arch))

    # -- layout, read from the YAML without building anything ----------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """AR steps per image: one per token."""
        return int(self.teacher.arch["block_size"])

    @property
    def sequence_length(self) -> int:
        return int(self.teacher.arch["block_size"])

    @property
    def num_classes(self) -> int:
        return int(self.teacher.arch["num_classes"])

    #: wrapper of exported students: ``{'ema': ..., 'model': ...}`` (official LlamaGen-DD layout)
    export_keys = ("ema", "model")
    #: what a timestep counts (error messages)
    timestep_unit = "tokens"

    def build_family(self, device: str | torch.device = "cpu", teacher_dtype: torch.dtype | None = None,
                     load_teacher: bool = True) -> LlamaGenFamily:
        """Tokenizer + teacher; ``load_teacher=False`` gives a shape-only teacher on the meta device (samplers that
        never run the teacher)."""
        spec = with_local_weights(self, ("tokenizer", "teacher") if load_teacher else ("tokenizer",))
        teacher = spec.build_teacher(device=device) if load_teacher else build_teacher(device="meta",
                                                                                      **self.teacher.arch)
        return self.make_family(spec.build_tokenizer(device=device), teacher, teacher_dtype)

    def make_family(self, tokenizer: VQTokenizer, teacher: LlamaGenGPT, teacher_dtype: torch.dtype | None = None
                    ) -> LlamaGenFamily:
        """The family of already built modules (e.g. with random weights for speed benchmarks)."""
        return LlamaGenFamily(tokenizer, teacher, name=self.name, teacher_dtype=teacher_dtype)

    def build_student(self, codebook: torch.Tensor, init: str = "teacher", checkpoint: str | None = None,
                      checkpoint_key: str | None = None, teacher: LlamaGenGPT | None = None,
                      device: str | torch.device = "cpu") -> LlamaGenDDStudent:
        """init: "teacher" (official DD init from the teacher), "checkpoint" (a DD student file: ``checkpoint`` or
        the preset's), or "random"."""
        spec = self
        if init == "checkpoint":  # resolve (and fail on a missing file) before building the model
            student = ComponentSpec({}, checkpoint or self.student.checkpoint,
                                    checkpoint_key or self.student.checkpoint_key)
            spec = with_local_weights(dataclasses.replace(self, student=student), ("student",))
        model = build_student(codebook=codebook, **self.student_arch)
        if init == "teacher":
            model.init_from_teacher(teacher if teacher is not None else self.build_teacher())
        elif init == "checkpoint":
            spec._load(model, spec.student, "student")
        elif init != "random":
            raise ValueError(f"init={init!r}: expected 'teacher', 'checkpoint' or 'random'")
        return model.to(device)

    def _load(self, model: torch.nn.Module, component: ComponentSpec, kind: str) -> None:
        load_component(model, component, kind, self.name, load_weights)


def spec_from_config(cfg: dict[str, Any]) -> LlamaGenSpec:
    """Build a spec from a plain ``model`` config mapping (what ``configs/model/<preset>.yaml`` holds)."""
    component = component_from_config
    return LlamaGenSpec(name=cfg["name"], tokenizer=component(cfg["tokenizer"]), teacher=component(cfg["teacher"]),
                        student=component(cfg["student"]), sampling=SamplingConfig(**cfg.get("sampling", {})),
                        image_size=int(cfg.get("image_size", 256)), family=cfg.get("family", "llamagen"),
                        default_t_list=tuple(int(t) for t in cfg.get("default_t_list", (0,))),
                        default_split_t=int(cfg.get("default_split_t", 0)))


def make_spec(**cfg: Any) -> LlamaGenSpec:
    """Keyword form of ``spec_from_config``: the ``_target_`` of the LlamaGen presets in ``configs/model/``."""
    cfg.pop("_target_", None)
    return spec_from_config(cfg)
