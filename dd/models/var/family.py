"""The VAR family behind the ``ARFamily`` protocol: one timestep = one scale; tokens in flat scale order.

Timestep t in 0..num_scales counts generated scales; X_t holds codebook rows for the first ``data_length(t)``
tokens (0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680 for the 10-scale models) and the original noise after them.
"""

from __future__ import annotations

import torch

from dd.acceleration import CompileOptions, check_fast_path
from dd.models.codebook import nearest_code_indices
from dd.models.var.generation import PREFIX_ATTENTION, var_generate
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE
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

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, Cvae) continuous tokens -> images (B, 3, H, W) in [-1, 1] (differentiable: perceptual losses)."""
        return self.tokenizer.decode_tokens(tokens.float())

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(self.codebook()[ids])
