"""``VARSpec``: one VAR preset (multi-scale VQVAE + VAR teacher + DD student) as ``configs/model/var_*.yaml`` says.

The VQVAE's arguments fix what the transformers share (``vocab_size``, ``z_channels``, the scale schedule
``v_patch_nums``); the teacher entry holds the transformer shape, and the student has the teacher's shape. The
YAML is the only size table; nothing is built at construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dd.models.presets import ComponentSpec, component_from_config, load_component, with_local_weights
from dd.models.var.builders import build_student, build_teacher, build_vqvae, load_weights
from dd.models.var.family import VARFamily
from dd.models.var.student import VARDDStudent
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE
from dd.sampling.logits import SamplingConfig


@dataclass(frozen=True)
class VARSpec:
    """A VAR preset. ``sampling.cfg_scale`` is VAR's ``cfg`` (linear ramp over scales, 0 = no guidance);
    ``top_p = 1.0`` disables nucleus filtering. Timesteps and ``split_t`` are in scales."""

    name: str
    tokenizer: ComponentSpec
    teacher: ComponentSpec
    student: ComponentSpec
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    image_size: int = 256
    family: str = "var"
    default_t_list: tuple[int, ...] = (0,)
    default_split_t: int = 0
    prefix_attention: str = "bidirectional"

    #: wrapper of exported students: ``{'trainer': {'ema_parameters': ..., 'var_wo_ddp': ...}}`` (VAR-DD layout)
    export_keys = ("trainer.ema_parameters", "trainer.var_wo_ddp")
    #: what a timestep counts (error messages)
    timestep_unit = "scales"

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.tokenizer.arch.get("v_patch_nums", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)))

    @property
    def teacher_arch(self) -> dict[str, Any]:
        """The transformer's arguments: the teacher entry plus what the VQVAE fixes."""
        vq = self.tokenizer.arch
        return {**self.teacher.arch, "vocab_size": int(vq["vocab_size"]), "z_channels": int(vq["z_channels"]),
                "patch_nums": list(self.patch_nums)}

    @property
    def student_arch(self) -> dict[str, Any]:
        return {**self.teacher_arch, **self.student.arch}

    # -- layout, read from the YAML without building anything ----------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """AR steps per image: one per scale."""
        return len(self.patch_nums)

    @property
    def sequence_length(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def num_classes(self) -> int:
        return int(self.teacher.arch["num_classes"])

    def meta_models(self) -> tuple[MultiScaleVQVAE, VARTransformer, VARDDStudent]:
        """VQVAE, teacher and student on the meta device (shapes and parameter counts, no memory)."""
        return (build_vqvae(device="meta", **self.tokenizer.arch), build_teacher(device="meta", **self.teacher_arch),
                build_student(device="meta", **self.student_arch))

    # -- builders -------------------------------------------------------------------------------------------------
    def build_tokenizer(self, load: bool = True, device: str | torch.device = "cpu") -> MultiScaleVQVAE:
        spec = with_local_weights(self, ("tokenizer",)) if load else self
        model = build_vqvae(**self.tokenizer.arch)
        if load:
            load_component(model, spec.tokenizer, "tokenizer", self.name, load_weights)
        return model.to(device).eval()

    def build_teacher(self, load: bool = True, device: str | torch.device = "cpu") -> VARTransformer:
        spec = with_local_weights(self, ("teacher",)) if load else self
        model = build_teacher(**self.teacher_arch)
        if load:
            load_component(model, spec.teacher, "teacher", self.name, load_weights)
        return model.to(device).eval()

    def build_family(self, device: str | torch.device = "cpu", teacher_dtype: torch.dtype | None = None,
                     load_teacher: bool = True) -> VARFamily:
        """VQVAE + teacher; ``load_teacher=False`` gives a shape-only teacher on the meta device."""
        spec = with_local_weights(self, ("tokenizer", "teacher") if load_teacher else ("tokenizer",))
        teacher = spec.build_teacher(device=device) if load_teacher else build_teacher(device="meta",
                                                                                      **self.teacher_arch)
        return self.make_family(spec.build_tokenizer(device=device), teacher, teacher_dtype)

    def make_family(self, tokenizer: MultiScaleVQVAE, teacher: VARTransformer,
                    teacher_dtype: torch.dtype | None = None) -> VARFamily:
        """The family of already built modules (e.g. with random weights for speed benchmarks)."""
        return VARFamily(tokenizer, teacher, name=self.name, teacher_dtype=teacher_dtype,
                         prefix_attention=self.prefix_attention)

    def build_student(self, codebook: torch.Tensor, init: str = "teacher", checkpoint: str | None = None,
                      checkpoint_key: str | None = None, teacher: VARTransformer | None = None,
                      device: str | torch.device = "cpu") -> VARDDStudent:
        """init: "teacher" (official DD init from the teacher), "checkpoint" (a DD student file: ``checkpoint`` or
        the preset's; EMA entry unless ``checkpoint_key`` names another, e.g. ``trainer.var_wo_ddp``), "random"."""
        spec = self
        if init == "checkpoint":  # resolve (and fail on a missing file) before building the model
            student = ComponentSpec({}, checkpoint or self.student.checkpoint,
                                    checkpoint_key or self.student.checkpoint_key)
            spec = with_local_weights(dataclasses.replace(self, student=student), ("student",))
        model = build_student(codebook=codebook, **self.student_arch)
        if init == "teacher":
            model.init_from_teacher(teacher if teacher is not None else self.build_teacher())
        elif init == "checkpoint":
            load_component(model, spec.student, "student", self.name, load_weights)
        elif init != "random":
            raise ValueError(f"init={init!r}: expected 'teacher', 'checkpoint' or 'random'")
        return model.to(device)


def spec_from_config(cfg: dict[str, Any]) -> VARSpec:
    """Build a spec from a plain ``model`` config mapping (what ``configs/model/var_*.yaml`` holds)."""
    return VARSpec(name=cfg["name"], tokenizer=component_from_config(cfg["tokenizer"]),
                   teacher=component_from_config(cfg["teacher"]), student=component_from_config(cfg["student"]),
                   sampling=SamplingConfig(**cfg.get("sampling", {})), image_size=int(cfg.get("image_size", 256)),
                   family=cfg.get("family", "var"),
                   default_t_list=tuple(int(t) for t in cfg.get("default_t_list", (0,))),
                   default_split_t=int(cfg.get("default_split_t", 0)),
                   prefix_attention=cfg.get("prefix_attention", "bidirectional"))


def make_spec(**cfg: Any) -> VARSpec:
    """Keyword form of ``spec_from_config``: the ``_target_`` of the VAR presets in ``configs/model/``."""
    cfg.pop("_target_", None)
    return spec_from_config(cfg)
