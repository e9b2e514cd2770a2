"""LlamaGen VQ tokenizer (VQ-16 topology, configurable width) in pure torch.

Parameter names follow the official ``vq_ds16_c2i.pt["model"]`` state dict exactly, so official files load
with ``strict=True``. Images are ``(B, 3, H, W)`` in ``[-1, 1]``; a ``downsample_factor = 2 ** (len(ch_mult) - 1)``
grid of 8-d (``codebook_embed_dim``) latents is quantised against an l2-normalised codebook. Token indices are in
raster order (row-major over the latent grid), which is the order of the GPT sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dd.models.codebook import nearest_code_indices
from dd.models.conv_blocks import Downsample, Upsample, group_norm




def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 q/k/v convolutions and a residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        k = self.k(y).reshape(b, c, h * w)  # (B, C, HW)
        v = self.v(y).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, optional ``attn`` after each, optional resampling."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, with_attn: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(num_blocks)) if with_attn else nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid_block(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level(ch * in_mult[i], ch * mult, num_res_blocks, with_attn=(i == last), dropout=dropout)
            if i != last:
                level.downsample = Downsample(ch * mult)
            self.conv_blocks.append(level)
        width = ch * ch_mult[-1]
        self.mid = _mid_block(width, dropout)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f); output is not clamped."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid_block(width, dropout)
        self.conv_blocks = nn.ModuleList()
        in_ch = width
        levels = len(ch_mult)
        for k, mult in enumerate(reversed(ch_mult)):
            level = _Level(in_ch, ch * mult, num_res_blocks + 1, with_attn=(k == 0), dropout=dropout)
            if k != levels - 1:
                level.upsample = Upsample(ch * mult)
            self.conv_blocks.append(level)
            in_ch = ch * mult
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """l2-normalised nearest-neighbour quantiser. ``codebook_used`` is an inert training buffer kept for key parity."""

    def __init__(self, *, codebook_size: int, embed_dim: int, l2_norm: bool, show_usage: bool) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """The (V, d) codebook every consumer uses: l2-normalised rows when ``l2_norm`` is set."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) -> (quantised latent (B, d, h, w), flat indices (B*h*w,) in (batch, row, col) order)."""
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.l2_norm:
            z_flat = F.normalize(z_flat, p=2, dim=-1)
        codebook = self.codebook()
        indices = nearest_code_indices(z_flat, codebook)
        quant = codebook[indices].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2).contiguous()
        return quant, indices


class VQTokenizer(nn.Module):
    """LlamaGen ``VQModel``: encode images to token ids, decode ids or continuous latents to images.

    Builder arguments mirror the official ``ModelArgs`` plus ``ch`` (hard-coded to 128 upstream).
    """

    def __init__(self, *, codebook_size: int, codebook_embed_dim: int, ch: int, ch_mult: Sequence[int],
                 z_channels: int, num_res_blocks: int = 2, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = codebook_embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               z_channels=z_channels, dropout=dropout)
        self.decoder = Decoder(out_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               z_channels=z_channels, dropout=dropout)
        self.quantize = VectorQuantizer(codebook_size=codebook_size, embed_dim=codebook_embed_dim,
                                        l2_norm=codebook_l2_norm, show_usage=codebook_show_usage)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def codebook(self) -> torch.Tensor:
        """(V, d) codebook as used for tokens (l2-normalised for VQ-16)."""
        return self.quantize.codebook()

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> pre-quantisation latent (B, d, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (quantised latent (B, d, h, w), token ids (B, h*w) in raster order)."""
        quant, flat = self.quantize.quantize(self.encode_latent(images))
        return quant, flat.reshape(images.shape[0], -1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Continuous latent (B, d, h, w) -> images (B, 3, h*f, w*f), unclamped (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(latent))

    def indices_to_latent(self, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Token ids (B, h*w) (or flat) -> latent (B, d, h, w) of codebook rows."""
        h, w = grid
        rows = self.codebook()[indices.reshape(-1, h * w)]
        # contiguous: a channels-last view makes every decoder GroupNorm several times slower on CPU
        return rows.reshape(-1, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()

    def tokens_to_latent(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Continuous token sequence (B, h*w, d) in raster order -> latent (B, d, h, w)."""
        h, w = grid
        return tokens.reshape(tokens.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()

    def decode_indices(self, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Token ids (B, h*w) -> images, as the official ``decode_code``."""
        return self.decode(self.indices_to_latent(indices, grid))

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Continuous tokens (B, h*w, d) -> images; how DD decodes unsnapped student outputs."""
        return self.decode(self.tokens_to_latent(tokens, grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(quantise(encode(images)))."""
        quant, _ = self.encode(images)
        return self.decode(quant)
