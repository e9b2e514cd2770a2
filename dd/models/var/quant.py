"""VAR multi-scale residual quantiser (official ``quant.py``: ``VectorQuantizer2`` and the Phi convolutions).

Parameter and buffer names equal the official checkpoint keys under ``quantize.``: ``embedding.weight``,
``ema_vocab_hit_SV`` and, depending on ``share_quant_resi``, ``quant_resi.qresi_ls.{k}.*`` (partially shared, the
release), ``quant_resi.qresi.*`` (fully shared) or ``quant_resi.{k}.*`` (one Phi per scale).

Notation: B batch, Cvae latent channels, V vocabulary, SN number of scales, ``pn`` side of a scale's token map,
H = W = the last ``pn`` (side of the full latent). Every method here is non-mutating: unlike the official code it
never updates ``f_hat`` in place, so the same functions serve inference and autograd (training, perceptual losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd.models.codebook import nearest_code_indices


def area_down(x: torch.Tensor, pn: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, pn, pn) by area interpolation (adaptive average pooling), as the official code."""
    return F.interpolate(x, size=(pn, pn), mode="area")


def bicubic_up(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, pn, pn) -> (B, C, side, side), bicubic with align_corners=False (the official default)."""
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


def phi_ticks(count: int) -> np.ndarray:
    """Positions in [0, 1] of ``count`` shared Phi convs (float64, as upstream: 1/3K margins for K = 4, else 1/2K)."""
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    return np.linspace(margin, 1 - margin, count)


def phi_index_for(si: int, num_scales: int, count: int) -> int:
    """Which of ``count`` Phi convs scale ``si`` (of ``num_scales``) uses.

    The nearest tick to si/(SN-1) in float64 with numpy's first-minimum rule. Exact mathematical ties (e.g. si = 2 of
    SN = 5 sits at 0.5, between 13/36 and 23/36) are decided by float64 rounding, so this must stay a float64 numpy
    computation: it gives [0, 1, 2, 2, 3] for SN = 5 and [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] for SN = 10.
    """
    if count == 1:
        return 0
    # SN = 1 divides by zero upstream; its only scale sits at position 0
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(count) - at)))


class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h) with r = |quant_resi|; a Conv2d subclass so its keys are ``weight``/``bias``."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # same operation order as upstream (h*(1-r) + conv(h)*r) so rounding matches
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    # upstream drops the conv (and its keys) when the residual ratio is zero
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One Phi for every scale (``share_quant_resi == 1``); key ``qresi.*``."""

    def __init__(self, phi: nn.Module) -> None:
        super().__init__()
        self.qresi = phi
        self.count = 1

    def conv(self, k: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K Phi convs shared across scales by nearest tick (the release: K = 4); keys ``qresi_ls.{k}.*``."""

    def __init__(self, phis: Sequence[nn.Module]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        self.count = len(phis)

    def conv(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


class PhiNonShared(nn.ModuleList):
    """One Phi per tick (``share_quant_resi == 0``; ``default_qresi_counts`` or SN of them); keys ``{k}.*``."""

    def __init__(self, phis: Sequence[nn.Module]) -> None:
        super().__init__(phis)
        self.count = len(phis)

    def conv(self, k: int) -> nn.Module:
        return self[k]


class MultiScaleQuantizer(nn.Module):
    """Official ``VectorQuantizer2`` (inference paths; the training objective is in ``vqvae_training``).

    ``ema_vocab_hit_SV`` (SN, V) is a training statistic kept for key parity; inference never reads it.
    """

    def __init__(self, *, vocab_size: int, Cvae: int, patch_nums: Sequence[int], using_znorm: bool = False,
                 beta: float = 0.25, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.using_znorm, self.beta = using_znorm, beta
        if share_quant_resi == 0:
            count = default_qresi_counts or len(self.patch_nums)
            self.quant_resi: nn.Module = PhiNonShared([_make_phi(Cvae, quant_resi) for _ in range(count)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        else:
            self.quant_resi = PhiPartiallyShared([_make_phi(Cvae, quant_resi) for _ in range(share_quant_resi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    # -- Phi -----------------------------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi_index(self, si: int) -> int:
        """Index of the Phi conv scale ``si`` uses (see ``phi_index_for``)."""
        return phi_index_for(si, self.num_scales, self.quant_resi.count)

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Phi_si(h) = (1 - r) h + r conv_k(h), k = phi_index(si); h (B, Cvae, H, W)."""
        return self.quant_resi.conv(self.phi_index(si))(h)

    # -- codebook look-ups ---------------------------------------------------------------------------------------
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, Cvae) -> (N,) int64 nearest codebook rows: Euclidean argmin of |z|^2 + |e|^2 - 2 z.e, or with
        ``using_znorm`` the argmax cosine similarity. No gradient (indices are discrete); always float32, also under
        autocast, so indices do not depend on the caller's precision mode."""
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            z, weight = z.detach().float(), self.embedding.weight.detach().float()
            if self.using_znorm:
                return (F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).t()).argmax(dim=1)
            return nearest_code_indices(z, weight)

    def embed_map(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """Ids (B, pn*pn) in raster order -> embeddings (B, Cvae, pn, pn)."""
        return self.embedding(idx).reshape(idx.shape[0], pn, pn, self.Cvae).permute(0, 3, 1, 2).contiguous()

    def scale_residual(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Contribution of scale ``si`` to f_hat: Phi_si(bicubic_up(h)), without upsampling at the last scale.

        h (B, Cvae, pn, pn) -> (B, Cvae, H, W).
        """
        if si != self.num_scales - 1:
            h = bicubic_up(h, self.patch_nums[-1])
        return self.phi(si, h)

    # -- image latent -> tokens ----------------------------------------------------------------------------------
    def quantize_scales(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residual multi-scale quantisation of f (B, Cvae, H, W) (official ``f_to_idxBl_or_fhat``).

        For each scale: z = area-down(f_rest, pn) (f_rest itself at the last scale), idx = nearest code,
        h = Phi_si(bicubic_up(embed(idx))), f_hat += h, f_rest -= h. Returns (per-scale ids (B, pn*pn) int64 in raster
        order, cumulative f_hat after each scale (B, Cvae, H, W)). f is detached, as upstream.
        """
        b, c, height, width = f.shape
        if height != self.patch_nums[-1] or width != self.patch_nums[-1]:
            raise ValueError(f"latent {height}x{width} does not match the last patch number {self.patch_nums[-1]}")
        f_rest = f.detach()
        f_hat = torch.zeros_like(f_rest)
        indices, fhats = [], []
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == self.num_scales - 1 else area_down(f_rest, pn)
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, pn * pn)
            h = self.scale_residual(si, self.embed_map(idx, pn))
            f_hat = f_hat + h
            f_rest = f_rest - h
            indices.append(idx)
            fhats.append(f_hat)
        return indices, fhats

    # -- tokens -> latent ----------------------------------------------------------------------------------------
    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Official ``get_next_autoregressive_input`` without the in-place update.

        h (B, Cvae, pn_si, pn_si). Returns (f_hat + Phi_si(bicubic_up(h)), area-down(new f_hat, pn_{si+1})) for
        si < SN-1 and (f_hat + Phi_si(h), the same tensor) at the last scale.
        """
        f_hat = f_hat + self.scale_residual(si, h)
        if si == self.num_scales - 1:
            return f_hat, f_hat
        return f_hat, area_down(f_hat, self.patch_nums[si + 1])

    def embed_to_fhat(self, ms_h: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Official ``embed_to_fhat(all_to_max_scale=True)``: per-scale maps (B, Cvae, pn, pn) -> cumulative f_hat
        after each scale, each (B, Cvae, H, W)."""
        side = self.patch_nums[-1]
        f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.Cvae, side, side, dtype=torch.float32)
        out = []
        for si, h in enumerate(ms_h):
            f_hat = f_hat + self.scale_residual(si, h)
            out.append(f_hat)
        return out

    def indices_to_var_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Official ``idxBl_to_var_input``: per-scale ids -> teacher-forcing input (B, L - pn_0^2, Cvae).

        Entry si+1 of the sequence is area-down(f_hat after scales 0..si, pn_{si+1}) flattened in raster order; the last
        scale's ids are not used.
        """
        b = indices[0].shape[0]
        side = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(b, self.Cvae, side, side)
        maps = []
        for si in range(self.num_scales - 1):
            f_hat, nxt = self.next_autoregressive_input(si, f_hat, self.embed_map(indices[si], self.patch_nums[si]))
            maps.append(nxt.reshape(b, self.Cvae, -1).transpose(1, 2))
        if not maps:
            return f_hat.new_zeros(b, 0, self.Cvae)
        return torch.cat(maps, dim=1)
