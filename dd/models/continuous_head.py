"""The continuous output head shared by the LlamaGen and VAR DD students (``final_layer_conti`` in both releases)."""

from __future__ import annotations

import torch
from torch import nn


class ContinuousHead(nn.Module):
    """PixArt-style final layer: LN_noaffine(h) * (1 + scale) + shift, shift/scale = ``scale_shift_table`` rows 0/1
    + class embedding, then Linear(dim -> out_dim). Parameter names match both official students."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.linear = nn.Linear(dim, out_dim, bias=True)

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """h (B, T, dim), class_emb (B, dim) -> (B, T, out_dim)."""
        shift, scale = (self.scale_shift_table[None] + class_emb[:, None, :]).chunk(2, dim=1)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """N(0, std) output weights, zero bias (the official DD initialisation of the new head)."""
        nn.init.normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)
