"""The VAR family behind the ``ARFamily`` protocol: one timestep = one scale; tokens in flat scale order.

Timestep t in 0..num_scales counts generated scales; X_t holds codebook rows for the first ``data_length(t)``
tokens (0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680 for the 10-scale models) and the original noise after them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dd.acceleration import CompileOptions, check_fast_path
from dd.models.codebook import nearest_code_indices
from dd.models.var.generation import PREFIX_ATTENTION, guided_logits, var_generate, var_log_probs
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE, flat_to_scales
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig


class VARFamily:
    """Multi-scale VQVAE (``tokenizer``) + VAR teacher.

    ``teacher_dtype`` runs teacher generation under autocast (None keeps the weights' dtype). ``prefix_attention``
    chooses how a given prefix of scales is read when the teacher continues it (teacher-involved sampling):
    ``"bidirectional"`` as the official ``intermediate_sample`` (no mask over the prefix), or ``"block_causal"``.
    ``fast_path`` is accepted for the protocol's sake and recorded, but the VAR teacher always runs eager: it makes
    only 10 forwards per image (one per scale, each of a different length over a growing KV cache), so launch
    overhead matters far less than for LlamaGen's 256 steps; the VAR student has its own fast path.
    """

    def __init__(self, tokenizer: MultiScaleVQVAE, teacher: VARTransformer, name: str = "var",
                 teacher_dtype: torch.dtype | None = None, prefix_attention: str = "bidirectional",
                 fast_path: str = "eager") -> None:
        if tokenizer.vocab_size != teacher.vocab_size or tokenizer.z_channels != teacher.z_channels:
            raise ValueError(f"VQVAE (V={tokenizer.vocab_size}, Cvae={tokenizer.z_channels}) does not match the "
                             f"teacher (V={teacher.vocab_size}, Cvae={teacher.z_channels})")
        if tuple(tokenizer.patch_nums) != tuple(teacher.patch_nums):
            raise ValueError(f"VQVAE scales {tokenizer.patch_nums} != teacher scales {teacher.patch_nums}")
        if prefix_attention not in PREFIX_ATTENTION:
            raise ValueError(f"prefix_attention={prefix_attention!r}: expected one of {PREFIX_ATTENTION}")
        self.name = name
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.teacher_dtype = teacher_dtype
        self.prefix_attention = prefix_attention
        self.sequence_length = teacher.sequence_length
        self.token_dim = teacher.z_channels
        self.num_timesteps = teacher.num_scales
        self.num_classes = teacher.num_classes
        self._data_lengths = [0] + [stop for _, stop in teacher.scale_slices]
        self.set_fast_path(fast_path)

    def set_fast_path(self, fast_path: str, compile_options: CompileOptions | None = None) -> None:
        """Recorded only: the VAR teacher's 10 scale forwards run eager whatever the setting (see the class)."""
        self.fast_path = check_fast_path(fast_path)

    def data_length(self, t: int) -> int:
        if not 0 <= t <= self.num_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_timesteps}] (scales of the sequence)")
        return self._data_lengths[int(t)]

    def codebook(self) -> torch.Tensor:
        return self.tokenizer.codebook()

    @torch.no_grad()
    def teacher_generate(self, labels: torch.Tensor, start_t: int, end_t: int, prefix: torch.Tensor | None,
                         sampling: SamplingConfig, chooser: TokenChooser) -> torch.Tensor:
        prefix_ids = None
        if start_t > 0:
            if prefix is None:
                raise ValueError(f"start_t={start_t} needs a prefix of {self.data_length(start_t)} tokens")
            prefix_ids = nearest_code_indices(prefix[:, :self.data_length(start_t)], self.codebook())
        enabled = self.teacher_dtype is not None
        with torch.autocast(labels.device.type, dtype=self.teacher_dtype or torch.bfloat16, enabled=enabled):
            result = var_generate(self.teacher, self.tokenizer, labels, sampling, chooser, start_scale=start_t,
                                  end_scale=end_t, prefix=prefix_ids, prefix_attention=self.prefix_attention)
        return result.indices

    @torch.no_grad()
    def teacher_log_probs(self, labels: torch.Tensor, ids: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """One block-causal teacher-forcing pass (``next_scale_loss``'s inputs, CFG-doubled unless cfg = 0, as
        ``var_generate``), then per scale si the sampler's rule: ``guided_logits`` (the CFG ramp, cond alone at
        si = 0), temperature, VAR's top-k / top-p, log-softmax. The distributions of ``teacher_generate`` from
        start_t = 0 (a given prefix read with ``prefix_attention="bidirectional"`` is another distribution)."""
        teacher = self.teacher
        batch = labels.shape[0]
        if ids.shape != (batch, self.sequence_length):
            raise ValueError(f"ids {tuple(ids.shape)}: expected (B={batch}, L={self.sequence_length})")
        guided = sampling.cfg_scale != 0  # var_generate doubles the batch for any non-zero cfg
        conditions = torch.cat([labels, torch.full_like(labels, teacher.null_class)]) if guided else labels
        was_training = teacher.training
        teacher.eval()  # no label dropout
        try:
            enabled = self.teacher_dtype is not None
            with torch.autocast(labels.device.type, dtype=self.teacher_dtype or torch.bfloat16, enabled=enabled):
                inputs = self.tokenizer.indices_to_var_input(flat_to_scales(ids, teacher.patch_nums))
                if guided:
                    inputs = torch.cat([inputs, inputs])
                logits = teacher(conditions, inputs).float()  # (B', L, V): the slots of scale s predict scale s
        finally:
            teacher.train(was_training)
        per_scale = [guided_logits(logits[:, begin:stop], batch, sampling.cfg_scale, si, teacher.num_scales)
                     for si, (begin, stop) in enumerate(teacher.scale_slices)]
        return var_log_probs(torch.cat(per_scale, dim=1), sampling)

    def feature_trunk(self) -> torch.nn.Module:
        return VARFeatureTrunk(self.teacher, self.tokenizer)

    def student_weights_from_trunk(self, student: torch.nn.Module, trunk: torch.nn.Module
                                   ) -> dict[str, torch.Tensor]:
        """Embeddings, blocks and head norm of the trunk's teacher copy, the level and position tables shifted by
        the student's extra first scale (``VARDDStudent.weights_from_teacher``)."""
        return student.weights_from_teacher(trunk.model.state_dict(), head=False)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, Cvae) continuous tokens -> images (B, 3, H, W) in [-1, 1] (differentiable: perceptual losses)."""
        return self.tokenizer.decode_tokens(tokens.float())

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(self.codebook()[ids])


class VARFeatureTrunk(nn.Module):
    """DD2's AR-diffusion trunk: a trainable copy of the VAR teacher without ``head`` and label dropout, plus a
    frozen copy of the VQVAE quantizer that builds the teacher-forcing input from ids (as ``next_scale_loss``).
    ``forward(labels, ids)`` -> (B, L, C): ``head_nm(h, cond)`` at every slot, those of scale s from the labels and
    scales < s (the last scale's ids are not read). The quantizer's parameters never receive gradients."""

    def __init__(self, teacher: VARTransformer, tokenizer: MultiScaleVQVAE) -> None:
        super().__init__()
        model = copy.deepcopy(teacher).requires_grad_(True)
        model.cond_drop_rate = 0.0
        del model.head
        self.model = model
        self.quantize = copy.deepcopy(tokenizer.quantize).requires_grad_(False)
        self.patch_nums = model.patch_nums
        self.feature_dim = teacher.embed_dim

    def forward(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            inputs = self.quantize.indices_to_var_input(flat_to_scales(ids, self.patch_nums))
        return self.model.features(labels, inputs)
