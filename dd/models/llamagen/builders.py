"""Builders and loaders for the LlamaGen family. Sizes come from YAML presets (``configs/model/*.yaml``) as keyword
arguments; Python keeps no size tables.

Example (notebook)::

    from dd.models.llamagen import build_teacher, load_weights
    teacher = build_teacher(dim=768, n_layer=12, n_head=12, vocab_size=16384, num_classes=1000, block_size=256)
    load_weights(teacher, "hf://FoundationVision/LlamaGen/c2i_B_256.pt", kind="teacher")
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from dd.checkpoint import CheckpointError, extract_state_dict, load_strict, read_checkpoint
from dd.models.presets import device_scope as _device_scope
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.student import LlamaGenDDStudent, reset_student_new_parameters
from dd.models.llamagen.tokenizer import VQTokenizer

_TEACHER_ONLY = ("class_dropout_prob", "token_dropout_p", "resid_dropout_p", "cls_token_num")


def _init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """The official LlamaGen init: N(0, std) for Linear and Embedding weights, zero biases."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)


def build_tokenizer(*, device: str | torch.device | None = None, **arch: Any) -> VQTokenizer:
    """A ``VQTokenizer`` from preset arguments (``codebook_size``, ``codebook_embed_dim``, ``ch``, ``ch_mult``, ...)."""
    with _device_scope(device):
        return VQTokenizer(**arch)


def build_teacher(*, device: str | torch.device | None = None, initializer_range: float = 0.02,
                  **arch: Any) -> LlamaGenGPT:
    """A ``LlamaGenGPT`` teacher from preset arguments, with the official weight initialisation."""
    with _device_scope(device):
        model = LlamaGenGPT(**arch)
    if str(device) != "meta":
        _init_transformer_weights(model, initializer_range)
        if hasattr(model.output, "weight"):
            nn.init.zeros_(model.output.weight)  # official: the output head starts at zero
    return model


def build_student(*, device: str | torch.device | None = None, codebook: torch.Tensor | None = None,
                  initializer_range: float = 0.02, **arch: Any) -> LlamaGenDDStudent:
    """A ``LlamaGenDDStudent`` from the teacher's preset arguments plus ``codebook_dim``.

    Teacher-only arguments (class dropout, dropouts) are accepted and ignored so one preset serves both.
    """
    student_arch = {k: v for k, v in arch.items() if k not in _TEACHER_ONLY}
    with _device_scope(device):
        model = LlamaGenDDStudent(codebook=codebook, **student_arch)
    if str(device) != "meta":
        _init_transformer_weights(model, initializer_range)
        reset_student_new_parameters(model, initializer_range)
    return model


def student_from_teacher(teacher: LlamaGenGPT, *, codebook: torch.Tensor, codebook_dim: int | None = None,
                         **arch: Any) -> LlamaGenDDStudent:
    """Build a student with the teacher's shape and initialise it from the teacher (official semantics)."""
    student = build_student(codebook=codebook, codebook_dim=codebook_dim or codebook.shape[1], **arch)
    student.init_from_teacher(teacher)
    return student.to(teacher.output.weight.device)


def load_weights(model: nn.Module, checkpoint: str | os.PathLike[str], *, kind: str, key: str | None = None,
                 preset: str | None = None) -> nn.Module:
    """Load an official or dd checkpoint into ``model`` with strict key matching; returns the model in eval mode.

    kind: "tokenizer", "teacher" or "student" (selects the default wrapper keys, see ``dd.checkpoint``).
    """
    obj = read_checkpoint(checkpoint)
    _check_resolution(obj, model, checkpoint, kind)
    state = extract_state_dict(obj, kind=kind, key=key)
    load_strict(model, state, what=f"LlamaGen {kind}", preset=preset)
    return model.eval()


def _check_resolution(obj: Any, model: nn.Module, checkpoint: str | os.PathLike[str], kind: str) -> None:
    """A transformer checkpoint whose training ``args`` name another token grid than the model's is refused: no
    LlamaGen weight depends on the grid (RoPE is not stored), so a 384-px file (24 x 24 tokens) would load strictly
    into a 256-px preset (16 x 16) and sample on the wrong position table."""
    args = obj.get("args") if isinstance(obj, dict) else None
    size, down = getattr(args, "image_size", None), getattr(args, "downsample_size", None)
    block = getattr(model, "block_size", None)
    grid = getattr(model, "grid_size", None) or (math.isqrt(block) if block else None)
    if not (isinstance(size, int) and isinstance(down, int) and down > 0 and grid):
        return
    if size // down != grid:
        raise CheckpointError(f"{checkpoint} was trained at image_size={size} ({size // down} x {size // down} tokens "
                              f"with downsample_size={down}), but the LlamaGen {kind} is built for {grid} x {grid} "
                              f"tokens ({grid * down} px): use the preset of that resolution, or the checkpoint "
                              f"trained at {grid * down} px")


_TOKENIZER_FIELDS = ("codebook_size", "codebook_embed_dim", "ch", "z_channels", "num_res_blocks", "codebook_l2_norm",
                     "codebook_show_usage", "in_channels")
_TRANSFORMER_FIELDS = ("dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier", "rope_base",
                       "norm_eps", "vocab_size", "num_classes", "block_size", "class_dropout_prob", "cls_token_num")


def arch_from_official_args(args: dict[str, Any], kind: str) -> dict[str, Any]:
    """Builder keyword arguments from an official ``ModelArgs``-style dict (e.g. ``vars(checkpoint['args'])``).

    kind: "tokenizer", "teacher" or "student". ``ch`` defaults to the official hard-coded 128 when absent.
    """
    if kind == "tokenizer":
        arch = {k: args[k] for k in _TOKENIZER_FIELDS if k in args}
        arch.setdefault("ch", 128)
        arch["ch_mult"] = list(args.get("encoder_ch_mult", args.get("ch_mult", (1, 1, 2, 2, 4))))
        return arch
    arch = {k: args[k] for k in _TRANSFORMER_FIELDS if k in args}
    if kind == "student":
        arch["codebook_dim"] = args.get("codebook_dim", 8)
    elif kind != "teacher":
        raise ValueError(f"kind={kind!r}: expected 'tokenizer', 'teacher' or 'student'")
    return arch
