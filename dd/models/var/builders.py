"""Builders and strict loaders for the VAR family. Sizes come from YAML presets (``configs/model/var_*.yaml``) as
keyword arguments; Python keeps no size tables.

Example (notebook)::

    from dd.models.var import build_teacher, load_weights
    teacher = build_teacher(depth=16, embed_dim=1024, num_heads=16, num_classes=1000, vocab_size=4096,
                            z_channels=32, patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    load_weights(teacher, "hf://FoundationVision/var/var_d16.pth", kind="teacher")
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dd.checkpoint import extract_state_dict, load_strict, read_checkpoint
from dd.models.presets import device_scope as _device_scope
from dd.models.var.student import VARDDStudent
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE

#: default wrapper keys per kind of VAR file (``dd.checkpoint.DEFAULT_KEYS``): VQVAE and teacher are raw state
#: dicts; DD students are ``{'trainer': {'ema_parameters': ..., 'var_wo_ddp': ...}}`` (EMA first)
_CHECKPOINT_KINDS = {"tokenizer": "tokenizer", "teacher": "teacher", "student": "var_student"}
#: buffers every VAR transformer derives from its shape; a DD file may omit them (unverified for the releases)
_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_VQ_HIT_BUFFER = "quantize.ema_vocab_hit_SV"


def build_vqvae(*, device: str | torch.device | None = None, **arch: Any) -> MultiScaleVQVAE:
    """A ``MultiScaleVQVAE`` from preset arguments (``vocab_size``, ``z_channels``, ``ch``, ``v_patch_nums``, ...)."""
    with _device_scope(device):
        return MultiScaleVQVAE(**arch)


def build_teacher(*, device: str | torch.device | None = None, **arch: Any) -> VARTransformer:
    """A VAR teacher from preset arguments, with VAR-style initialisation (for training from scratch)."""
    with _device_scope(device):
        model = VARTransformer(**arch)
    if str(device) != "meta":
        model.init_weights()
    return model


def build_student(*, device: str | torch.device | None = None, codebook: torch.Tensor | None = None,
                  **arch: Any) -> VARDDStudent:
    """A VAR DD student with the teacher's shape (same preset arguments)."""
    with _device_scope(device):
        model = VARDDStudent(codebook=codebook, **arch)
    if str(device) != "meta":
        model.init_weights()
        model.init_new_parameters()
    return model


def _complete_derived_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Supply the shape-derived buffers (level table, attention mask, zero k-biases) when a file has none of them.

    Only all-or-nothing: a file with some of them goes to the strict check unchanged."""
    own = model.state_dict()
    derived = [k for k in own if k in _DERIVED_BUFFERS or k.endswith(".zero_k_bias")]
    if not derived or any(k in state for k in derived):
        return state
    return {**state, **{k: own[k] for k in derived}}


def _official_vq_hit_buffer(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official VQVAE replaces a usage-statistics buffer recorded for another number of scales by its own."""
    own = model.state_dict().get(_VQ_HIT_BUFFER)
    if own is None or _VQ_HIT_BUFFER not in state or state[_VQ_HIT_BUFFER].shape[0] == own.shape[0]:
        return state
    return {**state, _VQ_HIT_BUFFER: own}


def load_weights(model: nn.Module, checkpoint: str | os.PathLike[str], *, kind: str, key: str | None = None,
                 preset: str | None = None) -> nn.Module:
    """Load an official or dd VAR checkpoint with strict key matching; returns the model in eval mode.

    kind: "tokenizer" (VQVAE), "teacher" or "student" (``['trainer']['ema_parameters']`` unless ``key`` says
    otherwise, e.g. ``key="trainer.var_wo_ddp"``)."""
    if kind not in _CHECKPOINT_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(_CHECKPOINT_KINDS)}")
    state = extract_state_dict(read_checkpoint(checkpoint), kind=_CHECKPOINT_KINDS[kind],
                               key=key)
    state = _official_vq_hit_buffer(model, _complete_derived_buffers(model, state))
    load_strict(model, state, what=f"VAR {kind}", preset=preset)
    return model.eval()


def student_from_teacher(teacher: VARTransformer, *, codebook: torch.Tensor, **arch: Any) -> VARDDStudent:
    """A student of the teacher's shape initialised from it (official ``init_with_teacher`` semantics)."""
    student = build_student(codebook=codebook, **arch)
    student.init_from_teacher(teacher)
    return student.to(teacher.head.weight.device)
