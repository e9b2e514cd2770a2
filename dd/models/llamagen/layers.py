"""Llama-style building blocks shared by the LlamaGen teacher and its DD student.

RMSNorm, SwiGLU, 2-D RoPE with the official zero rows at the class slots, attention with an optional static KV
cache. Key names match the official ``autoregressive/models/gpt.py`` state dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Hidden width of the SwiGLU: int(2 * 4 * dim / 3), optionally scaled, rounded *up* to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in float32, cast back, times ``weight`` (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), all bias-free."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """The official 2-D RoPE table, shape (cls_token_num + grid_size**2, head_dim // 2, 2) of (cos, sin), float32.

    Frequencies f_m = base^(-2m / (head_dim/2)), m < head_dim/4. The first half of the rotary pairs rotates by
    row * f, the second half by column * f (row-major grid). The class rows are all zeros (cos = sin = 0), which
    zeroes q and k at the class slots exactly as the official model does.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles_1d = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # (grid, n)
    rows = angles_1d[:, None, :].expand(grid_size, grid_size, -1)
    cols = angles_1d[None, :, :].expand(grid_size, grid_size, -1)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, half)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x (B, T, H, head_dim) by table (T, head_dim/2, 2), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Static per-layer key/value buffers (B, H, max_seq, head_dim), written in place at ``input_pos``."""

    def __init__(self, batch: int, heads: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, head_dim) at positions ``input_pos`` (T,); return the whole caches."""
        self.k_cache[:, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    """Multi-head causal attention with fused bias-free ``wqkv`` and ``wo`` (grouped KV heads supported)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None, cache_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); rope (T, head_dim/2, 2) rows for these positions.

        Without ``kv_len`` attention is causal over the T given slots, which start at position 0 (full sequence or
        cache prefill; the cache, if any, is written at ``input_pos``). With ``kv_len`` (cached decoding of one
        token) the query attends to the first ``kv_len`` cached keys, i.e. every position up to its own: the same
        result as the official full-cache boolean mask without scanning the empty rest of the cache.
        With ``cache_mask`` (bool, broadcastable to (B, H, T, max_seq), True = attend) the queries attend over the
        whole static cache under that mask, the official formulation: shapes never change between decode steps
        and nothing is read on the host, which is what compiled and CUDA-graph decoding need.
        """
        b, t, _ = x.shape
        q_size = self.n_head * self.head_dim
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, t, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None and input_pos is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if cache_mask is not None:
                k, v = k_all, v_all
            elif kv_len is not None:
                if t != 1:
                    raise ValueError("cached decoding takes one token per step")
                k, v = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        causal = kv_len is None and cache_mask is None
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=cache_mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, t, q_size)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))."""

    def __init__(self, *, dim: int, n_head: int, n_kv_head: int, ffn_hidden: int, norm_eps: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, dropout)
        self.feed_forward = FeedForward(dim, ffn_hidden, dropout)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None, cache_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, kv_len, cache_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class table ``embedding_table`` with an extra null row (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, with_null_row: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(with_null_row), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)
