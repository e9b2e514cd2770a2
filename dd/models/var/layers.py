"""Building blocks of the VAR transformer (``models/basic_var.py``): AdaLN self-attention blocks and the AdaLN head
norm, with parameter names equal to the official state dicts (``blocks.{i}.attn.mat_qkv.weight``, ...).

Shapes: B batch, L tokens, C width, H heads, hd = C / H head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: q is scaled by exp(min(scale_mul, ln 100)) after l2 normalisation (official clamp)
_MAX_LOG_SCALE = math.log(100.0)


class KVCache:
    """Keys and values of the tokens seen so far, (B, H, T, hd) each, grown one scale at a time."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's keys/values; returns everything cached so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class SelfAttention(nn.Module):
    """VAR attention: fused qkv without its own bias (the bias is concat(q_bias, zero_k_bias, v_bias)), optional
    l2-normalised q/k with a learnable per-head temperature, additive float mask."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, L, C); attn_bias (1, 1, L, T) additive (0 / -inf) or None; with a cache the keys/values of earlier
        scales are prepended (T = cached + L)."""
        batch, length, width = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        if self.attn_l2_norm:
            temperature = self.scale_mul_1H11.clamp(max=_MAX_LOG_SCALE).exp()
            q = F.normalize(q, dim=-1) * temperature
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttnBlock(nn.Module):
    """``AdaLNSelfAttn`` with ``shared_aln=False``: the class condition modulates both branches through
    ``ada_lin`` = SiLU -> Linear(C, 6C), split as (gamma1, gamma2, scale1, scale2, shift1, shift2)::

        x = x + Attn(LN(x) (1 + scale1) + shift1) gamma1
        x = x + between                      # DD students: layer-wise noise/data embedding (None for teachers)
        x = x + FFN(LN(x) (1 + scale2) + shift2) gamma2
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 attn_l2_norm: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FeedForward(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: KVCache | None = None, between: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C), cond (B, C) class embeddings -> (B, L, C)."""
        mod = self.ada_lin(cond).view(-1, 1, 6, self.embed_dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, attn_bias, cache) * gamma1
        if between is not None:
            x = x + between
        return x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    """``head_nm``: LN(h) (1 + scale) + shift with (scale, shift) = Linear(SiLU(cond)) split in that order."""

    def __init__(self, embed_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.embed_dim).unbind(2)
        return self.ln_wo_grad(h) * (scale + 1) + shift


def scale_levels(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(L,) int64: the scale index of every token position (``lvl_1L`` without its leading 1)."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def block_causal_bias(levels: torch.Tensor) -> torch.Tensor:
    """(1, 1, L, L) float: 0 where level(key) <= level(query) (earlier scales and the own scale), -inf elsewhere."""
    allowed = levels[None, :] <= levels[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


def trunc_normal_init(module: nn.Module, std: float) -> None:
    """VAR-style initialisation: truncated-normal Linear/Embedding weights (std), zero biases."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(sub.weight, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
