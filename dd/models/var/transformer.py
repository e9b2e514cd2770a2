"""The VAR class-conditional next-scale transformer (``models/var.py``, ``VAR``) in pure torch.

Sequence layout (L = sum of pn^2 over the scales, 680 for the 256 px models): slot 0 ("sos") holds the class
embedding plus ``pos_start``; slots 1..L-1 hold ``word_embed`` of the teacher-forcing input (the area-downsampled
cumulative f_hat of the previous scales); every slot then gets its level and position embedding. The logits at the
slots of scale s predict the token map of scale s. Parameter and buffer names match the official raw state dicts
(``var_d16.pth`` ...), including the buffers ``lvl_1L``, ``attn_bias_for_masking`` and every ``zero_k_bias``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from dd.models.var.layers import (
    AdaLNBeforeHead,
    AdaLNSelfAttnBlock,
    KVCache,
    block_causal_bias,
    scale_levels,
    trunc_normal_init,
)


class VARTransformer(nn.Module):
    """The VAR teacher. Builder arguments are the official ``VAR`` constructor fields (``depth``, ``embed_dim``,
    ``num_heads``, ``mlp_ratio``, ``norm_eps``, ``attn_l2_norm``, ``cond_drop_rate``, ``patch_nums``, ...) plus
    ``vocab_size`` and ``z_channels`` of the VQVAE. Only ``shared_aln=False`` (all released models) is supported;
    dropout / drop-path are training-only and left out (the released models use none at inference)."""

    def __init__(self, *, depth: int, embed_dim: int, num_heads: int, num_classes: int, vocab_size: int,
                 z_channels: int, patch_nums: Sequence[int], mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 attn_l2_norm: bool = True, cond_drop_rate: float = 0.1, shared_aln: bool = False,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 **_ignored: object) -> None:
        super().__init__()
        if shared_aln:
            raise ValueError("shared_aln=True is not supported (no released VAR model uses it)")
        self.depth, self.embed_dim, self.num_heads = depth, embed_dim, num_heads
        self.num_classes, self.vocab_size, self.z_channels = num_classes, vocab_size, z_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.num_scales = len(self.patch_nums)
        self.cond_drop_rate = cond_drop_rate
        self.sequence_length = sum(pn * pn for pn in self.patch_nums)
        ends = list(itertools.accumulate(pn * pn for pn in self.patch_nums))
        self.scale_slices = tuple(zip([0] + ends[:-1], ends))
        self.init_std = math.sqrt(1 / embed_dim / 3)
        self._build_embeddings()
        self.blocks = nn.ModuleList(AdaLNSelfAttnBlock(embed_dim, num_heads, mlp_ratio, norm_eps, attn_l2_norm)
                                    for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)
        levels = self._levels()
        self.register_buffer("lvl_1L", levels[None])
        self.register_buffer("attn_bias_for_masking", self._attention_bias(levels))

    def _build_embeddings(self) -> None:
        c = self.embed_dim
        self.word_embed = nn.Linear(self.z_channels, c)
        self.class_emb = nn.Embedding(self.num_classes + 1, c)  # the last row is the null class of CFG
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.slots, c))
        self.lvl_embed = nn.Embedding(self.num_levels, c)

    # The DD student overrides these three (one extra leading scale, another mask).
    @property
    def slots(self) -> int:
        return self.sequence_length

    @property
    def num_levels(self) -> int:
        return self.num_scales

    def _levels(self) -> torch.Tensor:
        return scale_levels(self.patch_nums)

    def _attention_bias(self, levels: torch.Tensor) -> torch.Tensor:
        return block_causal_bias(levels)

    @property
    def null_class(self) -> int:
        return self.num_classes

    # -- initialisation (training from scratch) -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> None:
        """VAR-style initialisation for training from scratch: truncated normal (std sqrt(1/(3C))) everywhere,
        a small head, AdaLN modulation scaled down (gates nearly closed), residual projections scaled by
        1/sqrt(2 depth)."""
        trunc_normal_init(self, self.init_std)
        for param in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(param, std=self.init_std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        c = self.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            weight = block.ada_lin[-1].weight
            weight[2 * c:].mul_(init_adaln)
            weight[:2 * c].mul_(init_adaln_gamma)

    # -- embeddings -------------------------------------------------------------------------------------------------
    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> (B, C). In training mode labels drop to the null class with ``cond_drop_rate`` (CFG
        training); unlike the official forward, evaluation mode never drops labels."""
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.class_emb(labels)

    def level_position(self, start: int, stop: int) -> torch.Tensor:
        """(1, stop - start, C): level + absolute position embedding of slots start .. stop - 1."""
        return self.lvl_embed(self.lvl_1L[:, start:stop]) + self.pos_1LC[:, start:stop]

    def sos(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, C): the first slot, class embedding + pos_start (level/position not yet added)."""
        return cond[:, None, :] + self.pos_start

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """h (B, L, C) -> float32 logits (B, L, V) (the official ``get_logits``)."""
        return self.head(self.head_nm(h.float(), cond)).float()

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None,
                   caches: Sequence[KVCache] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cond, attn_bias, None if caches is None else caches[i])
        return x

    # -- teacher forcing --------------------------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor, x_wo_first: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels (B,), x_wo_first (B, L - 1, Cvae) (``idxBl_to_var_input``) -> logits (B, L, V).

        Fewer than L - 1 inputs evaluate a prefix of the sequence (the mask is cropped)."""
        h, cond = self._teacher_forced(labels, x_wo_first)
        return self.logits(h, cond)

    def features(self, labels: torch.Tensor, x_wo_first: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the last linear layer: ``head_nm(h, cond)`` (B, L, C), the input of ``head``
        (features of scale s depend only on the labels and the scales before s)."""
        h, cond = self._teacher_forced(labels, x_wo_first)
        return self.head_nm(h.float(), cond)

    def _teacher_forced(self, labels: torch.Tensor, x_wo_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' output (B, L, C) over [sos, word_embed(x_wo_first)] under the block-causal mask, and cond."""
        cond = self.class_condition(labels)
        h = torch.cat([self.sos(cond), self.word_embed(x_wo_first.float())], dim=1)
        length = h.shape[1]
        h = h + self.level_position(0, length)
        bias = self.attn_bias_for_masking[:, :, :length, :length]
        return self.run_blocks(h, cond, bias), cond
