"""``LlamaGenSpec``: one model preset (tokenizer + teacher + student), as the YAML in ``configs/model/`` describes it.

The YAML is the only size table. A spec builds and loads models on demand; nothing is allocated at construction.
``bundled://<file>`` checkpoint references resolve to weights shipped inside the ``dd`` package (``dd/assets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dd.checkpoint import CheckpointError
from dd.models.llamagen.builders import build_student, build_teacher, build_tokenizer, load_weights
from dd.models.llamagen.family import LlamaGenFamily
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.student import LlamaGenDDStudent
from dd.models.llamagen.tokenizer import VQTokenizer
from dd.sampling.logits import SamplingConfig

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
BUNDLED_PREFIX = "bundled://"
RANDOM_PREFIX = "random:"


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights of a sane scale for ``checkpoint: random:<seed>`` (tests and speed benchmarks only):
    every weight matrix N(0, 1/fan_in), so logits are O(1) and every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        elif name.endswith("bias"):
            param.zero_()


def resolve_bundled(reference: str | None) -> str | None:
    """Map ``bundled://name`` to the packaged asset path; other references pass through unchanged."""
    if reference is None or not str(reference).startswith(BUNDLED_PREFIX):
        return reference
    path = ASSETS_DIR / str(reference)[len(BUNDLED_PREFIX):]
    if not path.is_file():
        raise CheckpointError(f"bundled weights {path} are missing from this installation of dd; reinstall dd "
                              f"or train them with the scripts in scripts/ (see README, 'Bundled tiny teachers').")
    return str(path)


@dataclass(frozen=True)
class ComponentSpec:
    """Architecture keyword arguments plus where the weights come from."""

    arch: dict[str, Any]
    checkpoint: str | None = None
    checkpoint_key: str | None = None


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
        model = build_tokenizer(**self.tokenizer.arch)
        if load:
            self._load(model, self.tokenizer, "tokenizer")
        return model.to(device).eval()

    def build_teacher(self, load: bool = True, device: str | torch.device = "cpu") -> LlamaGenGPT:
        model = build_teacher(**self.teacher.arch)
        if load:
            self._load(model, self.teacher, "teacher")
        return model.to(device).eval()

    def build_family(self, device: str | torch.device = "cpu", teacher_dtype: torch.dtype | None = None
                     ) -> LlamaGenFamily:
        return LlamaGenFamily(self.build_tokenizer(device=device), self.build_teacher(device=device),
                              name=self.name, teacher_dtype=teacher_dtype)

    def build_student(self, codebook: torch.Tensor, init: str = "teacher", checkpoint: str | None = None,
                      checkpoint_key: str | None = None, teacher: LlamaGenGPT | None = None,
                      device: str | torch.device = "cpu") -> LlamaGenDDStudent:
        """init: "teacher" (official DD init from the teacher), "checkpoint" (a DD student file: ``checkpoint`` or
        the preset's), or "random"."""
        model = build_student(codebook=codebook, **self.student_arch)
        if init == "teacher":
            model.init_from_teacher(teacher if teacher is not None else self.build_teacher())
        elif init == "checkpoint":
            source = ComponentSpec({}, checkpoint or self.student.checkpoint, checkpoint_key or self.student.checkpoint_key)
            self._load(model, source, "student")
        elif init != "random":
            raise ValueError(f"init={init!r}: expected 'teacher', 'checkpoint' or 'random'")
        return model.to(device)

    def _load(self, model: torch.nn.Module, component: ComponentSpec, kind: str) -> None:
        if component.checkpoint is not None and str(component.checkpoint).startswith(RANDOM_PREFIX):
            random_weights(model, int(str(component.checkpoint)[len(RANDOM_PREFIX):] or 0))
            return
        if component.checkpoint is None:
            raise CheckpointError(f"preset {self.name!r} names no {kind} checkpoint; set model.{kind}.checkpoint")
        load_weights(model, resolve_bundled(component.checkpoint), kind=kind, key=component.checkpoint_key,
                     preset=self.name)


def spec_from_config(cfg: dict[str, Any]) -> LlamaGenSpec:
    """Build a spec from a plain ``model`` config mapping (what ``configs/model/<preset>.yaml`` holds)."""
    def component(entry: dict[str, Any]) -> ComponentSpec:
        return ComponentSpec(dict(entry.get("arch", {})), entry.get("checkpoint"), entry.get("checkpoint_key"))

    return LlamaGenSpec(name=cfg["name"], tokenizer=component(cfg["tokenizer"]), teacher=component(cfg["teacher"]),
                        student=component(cfg["student"]), sampling=SamplingConfig(**cfg.get("sampling", {})),
                        image_size=int(cfg.get("image_size", 256)), family=cfg.get("family", "llamagen"),
                        default_t_list=tuple(int(t) for t in cfg.get("default_t_list", (0,))),
                        default_split_t=int(cfg.get("default_split_t", 0)))


def make_spec(**cfg: Any) -> LlamaGenSpec:
    """Keyword form of ``spec_from_config``: the ``_target_`` of the LlamaGen presets in ``configs/model/``."""
    cfg.pop("_target_", None)
    return spec_from_config(cfg)
