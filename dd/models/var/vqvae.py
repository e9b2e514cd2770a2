"""VAR multi-scale VQVAE (official ``models/vqvae.py`` + ``basic_vae.py``, checkpoint ``vae_ch160v4096z32.pth``).

Parameter and buffer names equal the official raw state dict, so the released file loads with ``strict=True`` and no
key mapping. The official model hard-codes ``ch_mult = (1, 1, 2, 2, 4)`` and 2 (encoder) / 3 (decoder) ResNet blocks
per level; both are constructor arguments here (same defaults) so tiny presets for small images are possible.

Images are (B, 3, H, W) in [-1, 1]. The encoder gives a latent f (B, Cvae, h, w) with h = w = the last patch number;
it is quantised into SN token maps of sides ``patch_nums`` (residual quantisation, see ``quant.py``). The flat token
sequence concatenates the scales, each in raster order: L = sum(pn^2) positions (680 for the release).
Unlike upstream nothing here modifies its inputs in place (``fhat_to_img`` clamps out of place, ``f_hat`` is never
accumulated in place), so every path also works under autograd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dd.models.conv_blocks import Downsample, Upsample, group_norm
from dd.models.var.quant import MultiScaleQuantizer

class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice plus a shortcut (1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 ``qkv`` conv (q, k, v in that channel order)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.C = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.w_ratio = channels**-0.5
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).unbind(1)  # each (B, C, HW)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.w_ratio, dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


def _attn(channels: int, enabled: bool) -> nn.Module:
    # upstream uses an Identity (no keys) when attention is switched off
    return AttnBlock(channels) if enabled else nn.Identity()


class _Level(nn.Module):
    """One resolution level: ``block.j`` ResNet blocks, each followed by ``attn.j`` when attention is on."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, with_attn: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(num_blocks)) if with_attn else nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    """ResNet, attention (``using_mid_sa``), ResNet at the lowest resolution."""

    def __init__(self, channels: int, using_mid_sa: bool, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = _attn(channels, using_mid_sa)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1).

    ``down.i`` holds level i (highest resolution first) with ``num_res_blocks`` blocks, attention at the last level
    when ``using_sa``, and ``downsample`` on every level but the last.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        in_mult = (1, *ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level(ch * in_mult[i], ch * mult, num_res_blocks, with_attn=(i == last and using_sa),
                           dropout=dropout)
            if i != last:
                level.downsample = Downsample(ch * mult)
            self.down.append(level)
        width = ch * ch_mult[-1]
        self.mid = _Mid(width, using_mid_sa, dropout)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, in_channels, h*f, w*f), unclamped.

    ``up.i`` is stored in resolution order (``up.{last}`` is the lowest resolution and runs first) with
    ``num_res_blocks + 1`` blocks, attention at the lowest level, and ``upsample`` on every level but ``up.0``.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _Mid(width, using_mid_sa, dropout)
        levels: list[_Level] = []
        block_in = width
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first, stored in resolution order
            level = _Level(block_in, ch * ch_mult[i], num_res_blocks + 1, with_attn=(i == last and using_sa),
                           dropout=dropout)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def scale_slices(patch_nums: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(begin, end) of each scale in the flat token sequence: scale si covers pn_si^2 positions."""
    out, begin = [], 0
    for pn in patch_nums:
        out.append((begin, begin + pn * pn))
        begin += pn * pn
    return tuple(out)


def flat_to_scales(x: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """(B, L, ...) flat sequence -> list of per-scale slices (B, pn^2, ...)."""
    total = sum(pn * pn for pn in patch_nums)
    if x.shape[1] != total:
        raise ValueError(f"sequence length {x.shape[1]} != sum(pn^2) = {total} for patch_nums {tuple(patch_nums)}")
    return [x[:, begin:end] for begin, end in scale_slices(patch_nums)]


def scales_to_flat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-scale (B, pn^2, ...) pieces -> the flat (B, L, ...) sequence."""
    return torch.cat(list(parts), dim=1)


class MultiScaleVQVAE(nn.Module):
    """Official ``VQVAE`` with the inference API the VAR teacher / DD student code uses.

    Constructor arguments mirror the official ones, plus ``ch_mult``, ``num_res_blocks``, ``using_sa``,
    ``using_mid_sa`` and ``in_channels`` (hard-coded upstream; defaults = the release). With ``test_mode`` the model is
    put in eval mode with frozen parameters, as upstream.
    """

    def __init__(self, *, vocab_size: int, z_channels: int, ch: int, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, beta: float = 0.25, using_znorm: bool = False,
                 quant_conv_ks: int = 3, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 using_sa: bool = True, using_mid_sa: bool = True, in_channels: int = 3,
                 test_mode: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.z_channels, self.Cvae = vocab_size, z_channels, z_channels
        self.patch_nums: tuple[int, ...] = tuple(int(pn) for pn in v_patch_nums)
        self.num_scales = len(self.patch_nums)
        self.scale_slices = scale_slices(self.patch_nums)
        self.sequence_length = self.scale_slices[-1][1]
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.image_size = self.patch_nums[-1] * self.downsample
        self.test_mode = test_mode
        arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                    in_channels=in_channels, dropout=dropout, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(vocab_size=vocab_size, Cvae=z_channels, patch_nums=self.patch_nums,
                                            using_znorm=using_znorm, beta=beta, quant_resi=quant_resi,
                                            share_quant_resi=share_quant_resi,
                                            default_qresi_counts=default_qresi_counts)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def prepare_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``state`` with ``quantize.ema_vocab_hit_SV`` replaced by this model's buffer when its number of
        scales differs (the official ``VQVAE.load_state_dict`` rule; the buffer is a training statistic only).

        Loaders that check shapes before ``load_state_dict`` (``dd.checkpoint.load_strict``) call this first.
        """
        state = dict(state)
        key = "quantize.ema_vocab_hit_SV"
        own = self.quantize.ema_vocab_hit_SV
        if key in state and state[key].shape[0] != own.shape[0]:
            state[key] = own.detach().clone()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` after ``prepare_state_dict`` (scoped to this class, as upstream)."""
        return super().load_state_dict(self.prepare_state_dict(state_dict), strict=strict, assign=assign)

    # -- codebook and Phi ----------------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """(V, Cvae) raw embedding weight (Euclidean codebook, not normalised)."""
        return self.quantize.embedding.weight

    def phi_index(self, si: int) -> int:
        """Which shared Phi conv scale ``si`` uses ([0, 0, 1, 1, 1, 2, 2, 3, 3, 3] for the release)."""
        return self.quantize.phi_index(si)

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Phi_si(h) = (1 - r) h + r conv_k(h) with r = |quant_resi|; h (B, Cvae, H, W)."""
        return self.quantize.phi(si, h)

    # -- images -> tokens ----------------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> f = quant_conv(encoder(images)) (B, Cvae, H/16, W/16)."""
        return self.quant_conv(self.encoder(images))

    def f_to_indices(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Residual multi-scale quantisation: per-scale ids (B, pn^2) int64, raster order."""
        return self.quantize.quantize_scales(f)[0]

    def f_to_fhat_per_scale(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Cumulative f_hat (B, Cvae, H', W') after each scale of the residual quantisation."""
        return self.quantize.quantize_scales(f)[1]

    def img_to_indices(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> per-scale ids (official ``img_to_idxBl``)."""
        return self.f_to_indices(self.encode_latent(images))

    # -- tokens -> latent ----------------------------------------------------------------------------------------
    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si`` (h (B, Cvae, pn, pn)) to f_hat; returns (new f_hat, next scale's input map).

        Non-mutating version of the official ``get_next_autoregressive_input``: the next map is
        area-down(new f_hat, pn_{si+1}) (B, Cvae, pn', pn'), or the new f_hat itself at the last scale.
        """
        return self.quantize.next_autoregressive_input(si, f_hat, h)

    def indices_to_var_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> teacher-forcing input (B, L - pn_0^2, Cvae) (official ``idxBl_to_var_input``)."""
        return self.quantize.indices_to_var_input(indices)

    def embed_to_fhat(self, ms_h: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale embeddings (B, Cvae, pn, pn) -> cumulative f_hat after each scale (``all_to_max_scale=True``)."""
        return self.quantize.embed_to_fhat(ms_h)

    def tokens_to_maps(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Flat continuous tokens (B, L, Cvae) -> per-scale maps (B, Cvae, pn, pn) (each slice in raster order)."""
        return [part.reshape(part.shape[0], pn, pn, self.Cvae).permute(0, 3, 1, 2)
                for part, pn in zip(flat_to_scales(tokens, self.patch_nums), self.patch_nums)]

    def tokens_to_fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat continuous tokens (B, L, Cvae) in scale order (what a DD student outputs) -> final f_hat
        (B, Cvae, H', W'), accumulated scale by scale with ``next_autoregressive_input``. Differentiable."""
        side = self.patch_nums[-1]
        f_hat = tokens.new_zeros(tokens.shape[0], self.Cvae, side, side)
        for si, h in enumerate(self.tokens_to_maps(tokens)):
            f_hat, _ = self.next_autoregressive_input(si, f_hat, h)
        return f_hat

    def indices_to_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat ids (B, L) -> codebook rows (B, L, Cvae)."""
        return self.quantize.embedding(indices)

    # -- latent -> images ----------------------------------------------------------------------------------------
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) -> images (B, 3, 16h, 16w) clamped to [-1, 1] (out of place)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat continuous tokens (B, L, Cvae) -> images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.tokens_to_fhat(tokens))

    def decode_indices(self, indices: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat ids (B, L) or a per-scale list of (B, pn^2) ids -> images (B, 3, H, W) in [-1, 1]
        (official ``idxBl_to_img(same_shape=True, last_one=True)``)."""
        if isinstance(indices, torch.Tensor):
            return self.decode_tokens(self.indices_to_tokens(indices))
        maps = [self.quantize.embed_map(idx, pn) for idx, pn in zip(indices, self.patch_nums)]
        return self.fhat_to_img(self.embed_to_fhat(maps)[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: images -> ids -> final f_hat -> images in [-1, 1]
        (official ``img_to_reconstructed_img(last_one=True)``; the official ``forward`` is the training pass, see
        ``dd.models.var.vqvae_training``)."""
        return self.fhat_to_img(self.f_to_fhat_per_scale(self.encode_latent(images))[-1])
