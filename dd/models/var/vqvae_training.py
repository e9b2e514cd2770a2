"""Training objective of the VAR multi-scale VQVAE (pure torch), as upstream ``VectorQuantizer2.forward`` in training.

For a latent f (B, Cvae, H, W) and SN scales (f_rest = sg[f], f_hat = 0)::

    z_si   = area-down(f_rest, pn_si)               (f_rest itself at the last scale)
    k_si   = nearest code of z_si                   (the inference look-up, so indices equal ``f_to_indices``)
    f_hat += Phi_si(bicubic_up(E[k_si]))            (gradient to the codebook E and the Phi convs)
    f_rest -= sg[that term]
    L_vq   = 1/SN sum_si ( beta ||sg[f_hat_si] - f||^2 + ||f_hat_si - sg[f]||^2 )
    f_st   = f + sg[f_hat - f]                      (straight-through estimator into the decoder)

so both losses compare the *cumulative* f_hat after each scale with f: the commitment term (beta, 0.25 upstream)
pulls the encoder, the codebook term moves the codebook and the Phi convs. The quantiser runs in float32 even under
autocast, as upstream. The per-scale hit counts can update the ``ema_vocab_hit_SV`` buffer with upstream's schedule
(copy, then 0.9 / 0.99 EMA); ``scale_usages`` turns it into upstream's per-scale usage percentages.

The full objective adds a pixel reconstruction loss on decoder(post_quant_conv(f_st)) (upstream VAR does not ship
its VQVAE trainer; the GAN / perceptual terms it used are not needed for 32x32 Fashion-MNIST).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dd.models.llamagen.training import reconstruction_loss
from dd.models.var.quant import MultiScaleQuantizer, area_down
from dd.models.var.vqvae import MultiScaleVQVAE

UPSTREAM_COMMITMENT_BETA = 0.25


@dataclass(frozen=True)
class MultiScaleQuantOutput:
    """Training-time multi-scale quantisation of f (B, Cvae, H, W).

    f_hat: (B, Cvae, H, W) straight-through latent (value = quantised f_hat, gradient flows to f).
    indices: per-scale ids (B, pn^2) int64 in raster order, equal to ``MultiScaleVQVAE.f_to_indices(f)``.
    vq_loss: scalar, mean over scales of beta * commitment + codebook loss.
    commitment, codebook: scalars (detached), the two parts averaged over scales, commitment *not* times beta.
    latents: (N, Cvae) detached query vectors z of every scale (candidates for dead-code restarts).
    hits: (SN, V) float code hit counts per scale.
    """

    f_hat: torch.Tensor
    indices: list[torch.Tensor]
    vq_loss: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor
    latents: torch.Tensor
    hits: torch.Tensor


@dataclass(frozen=True)
class VQVAELossOutput:
    """Total loss and its parts (detached scalars), the reconstruction and the quantiser output."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    vq: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor
    reconstruction: torch.Tensor
    quant: MultiScaleQuantOutput

    @property
    def flat_indices(self) -> torch.Tensor:
        """All scales' ids concatenated, (B, L)."""
        return torch.cat(self.quant.indices, dim=1)


def quantize_multiscale_straight_through(quantizer: MultiScaleQuantizer, f: torch.Tensor, *,
                                         beta: float | None = None) -> MultiScaleQuantOutput:
    """Upstream ``VectorQuantizer2.forward`` (training) on f (B, Cvae, H, W); see the module docstring.

    ``beta`` defaults to the quantiser's own (0.25 upstream).
    """
    beta = quantizer.beta if beta is None else beta
    with torch.autocast(device_type=f.device.type, enabled=False):
        f = f.float()
        b, c, height, width = f.shape
        f_no_grad = f.detach()
        f_rest = f_no_grad
        f_hat = torch.zeros_like(f_no_grad)
        indices, queries, hits = [], [], []
        commitment = codebook = f.new_zeros(())
        last = quantizer.num_scales - 1
        for si, pn in enumerate(quantizer.patch_nums):
            z = (f_rest if si == last else area_down(f_rest, pn)).permute(0, 2, 3, 1).reshape(-1, c)
            idx = quantizer.nearest(z)
            h = quantizer.scale_residual(si, quantizer.embed_map(idx.reshape(b, pn * pn), pn))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()  # upstream's f_rest carries no gradient either (argmin only)
            commitment = commitment + F.mse_loss(f_hat.detach(), f)
            codebook = codebook + F.mse_loss(f_hat, f_no_grad)
            indices.append(idx.reshape(b, pn * pn))
            queries.append(z.detach())
            hits.append(torch.bincount(idx, minlength=quantizer.vocab_size).float())
        commitment, codebook = commitment / quantizer.num_scales, codebook / quantizer.num_scales
        straight_through = f + (f_hat - f).detach()
    return MultiScaleQuantOutput(straight_through, indices, beta * commitment + codebook, commitment.detach(),
                                 codebook.detach(), torch.cat(queries), torch.stack(hits))


def vqvae_loss(vae: MultiScaleVQVAE, images: torch.Tensor, *, beta: float | None = None,
               reconstruction_kind: str = "l2", vq_weight: float = 1.0) -> VQVAELossOutput:
    """Full objective for images (B, 3, H, W) in [-1, 1]: pixel loss (``reconstruction_kind``: "l2", "l1",
    "l1+l2") of the unclamped decoder output + ``vq_weight`` * L_vq."""
    quant = quantize_multiscale_straight_through(vae.quantize, vae.encode_latent(images), beta=beta)
    reconstruction = vae.decoder(vae.post_quant_conv(quant.f_hat.to(images.dtype)))
    rec = reconstruction_loss(reconstruction, images, reconstruction_kind)
    total = rec + vq_weight * quant.vq_loss
    return VQVAELossOutput(total, rec.detach(), quant.vq_loss.detach(), quant.commitment, quant.codebook,
                           reconstruction, quant)


@torch.no_grad()
def record_hits(quantizer: MultiScaleQuantizer, hits: torch.Tensor) -> None:
    """Update ``ema_vocab_hit_SV`` (SN, V) with one step's hit counts (SN, V), upstream's schedule: the first step
    copies, the next 99 use EMA 0.9, later ones EMA 0.99. The step counter is ``quantizer.record_hit``."""
    buffer = quantizer.ema_vocab_hit_SV
    hits = hits.to(buffer)
    step = getattr(quantizer, "record_hit", 0)
    if step == 0:
        buffer.copy_(hits)
    else:
        keep = 0.9 if step < 100 else 0.99
        buffer.mul_(keep).add_(hits * (1 - keep))
    quantizer.record_hit = step + 1


def scale_usages(quantizer: MultiScaleQuantizer, positions_per_step: int, world_size: int = 1) -> list[float]:
    """Upstream per-scale codebook usage (%): codes whose EMA hit count reaches 8% of a uniform share,
    margin = world_size * positions_per_step / V * 0.08 with positions_per_step = B * H * W of the full latent."""
    margin = world_size * positions_per_step / quantizer.vocab_size * 0.08
    return [float((row >= margin).float().mean()) * 100 for row in quantizer.ema_vocab_hit_SV]
