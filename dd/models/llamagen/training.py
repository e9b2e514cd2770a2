"""Training losses for the LlamaGen family (pure torch): the VQ tokenizer objective and the teacher's next-token loss.

Used by ``scripts/train_tiny_tokenizer.py`` and ``scripts/train_tiny_teacher.py`` to train the bundled tiny preset.
The tokenizer objective is upstream LlamaGen's ``VectorQuantizer.forward`` in training mode without the GAN, the
perceptual and the entropy terms (Fashion-MNIST at 32x32 does not need them)::

    z_n = normalize(z), e_n = normalize(E)             (l2-normalised codebook, dimension d)
    k   = argmin_k ||z_n - e_n[k]||^2                  (the same look-up as ``VectorQuantizer.quantize``)
    L   = rec(x, D(z_n + sg[e_n[k] - z_n]))            (straight-through estimator)
        + ||sg[z_n] - e_n[k]||^2                       (codebook loss)
        + beta * ||z_n - sg[e_n[k]]||^2                (commitment loss, beta = 0.25 upstream)

Inference-time quantisation stays in ``tokenizer.VectorQuantizer.quantize`` (no gradients needed there); the
look-up here selects the same indices for the same latent. Dead codes (unused for a window of steps) can be
restarted on random encoder outputs to keep codebook usage high, as in VQGAN-LC / SoundStream-style k-means-free
restarts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dd.checkpoint import save_state_dict
from dd.lr import decayed
from dd.models.codebook import nearest_code_indices
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.tokenizer import VectorQuantizer, VQTokenizer

UPSTREAM_COMMITMENT_BETA = 0.25


@dataclass(frozen=True)
class QuantizerOutput:
    """Training-time quantisation of a latent (B, d, h, w).

    quant: (B, d, h, w) straight-through quantised latent (forward value = codebook rows, gradient flows to z).
    indices: (B*h*w,) int64 code ids in (batch, row, col) order, as ``VectorQuantizer.quantize``.
    latents: (B*h*w, d) the (l2-normalised) encoder outputs, detached; used for dead-code restarts.
    codebook_loss, commitment_loss: scalars; the commitment loss is *not* multiplied by beta.
    """

    quant: torch.Tensor
    indices: torch.Tensor
    latents: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


@dataclass(frozen=True)
class TokenizerLossOutput:
    """Total loss and its parts (scalars) plus the batch's code ids (B*h*w,) and normalised latents (B*h*w, d)."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    indices: torch.Tensor
    latents: torch.Tensor


def quantize_straight_through(quantizer: VectorQuantizer, z: torch.Tensor) -> QuantizerOutput:
    """Quantise z (B, d, h, w) against ``quantizer``'s codebook with a straight-through gradient.

    Computed in float32 even under autocast so the argmin matches ``VectorQuantizer.quantize``.
    """
    b, d, h, w = z.shape
    z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
    if quantizer.l2_norm:
        z_flat = F.normalize(z_flat, p=2, dim=-1)
    codebook = quantizer.codebook().float()
    indices = nearest_code_indices(z_flat.detach(), codebook.detach())
    selected = codebook[indices]
    codebook_loss = F.mse_loss(selected, z_flat.detach())
    commitment_loss = F.mse_loss(z_flat, selected.detach())
    straight_through = z_flat + (selected - z_flat).detach()
    # contiguous NCHW: a channels-last latent makes every decoder GroupNorm take PyTorch's slow CPU path (10x)
    quant = straight_through.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
    return QuantizerOutput(quant, indices, z_flat.detach(), codebook_loss, commitment_loss)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Pixel loss between reconstructions and images (B, C, H, W) in [-1, 1]: "l2" (MSE), "l1", or "l1+l2"."""
    reconstruction = reconstruction.float()
    if kind == "l2":
        return F.mse_loss(reconstruction, images)
    if kind == "l1":
        return F.l1_loss(reconstruction, images)
    if kind == "l1+l2":
        return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
    raise ValueError(f"reconstruction loss kind={kind!r}: expected 'l2', 'l1' or 'l1+l2'")


def tokenizer_loss(tokenizer: VQTokenizer, images: torch.Tensor, *, beta: float = UPSTREAM_COMMITMENT_BETA,
                   reconstruction_kind: str = "l2") -> TokenizerLossOutput:
    """The VQ training objective (module docstring) for images (B, 3, H, W) in [-1, 1]."""
    quantized = quantize_straight_through(tokenizer.quantize, tokenizer.encode_latent(images))
    reconstruction = tokenizer.decode(quantized.quant.to(images.dtype))
    rec = reconstruction_loss(reconstruction, images, reconstruction_kind)
    total = rec + quantized.codebook_loss + beta * quantized.commitment_loss
    return TokenizerLossOutput(total, rec.detach(), quantized.codebook_loss.detach(),
                               quantized.commitment_loss.detach(), quantized.indices, quantized.latents)


class DeadCodeRestarter:
    """Counts code hits over a window of steps and re-seeds codes with no hits on random recent encoder outputs.

    Usage per step: ``restarter.observe(indices)``; every ``window`` observed steps call
    ``restarter.restart(quantizer, latents, generator)``, which returns how many codes were restarted. Restarted
    rows are set to randomly chosen latents (B*h*w, d) of the current batch, so the next look-up can select them.
    """

    def __init__(self, codebook_size: int, window: int) -> None:
        self.codebook_size = codebook_size
        self.window = window
        self.counts = torch.zeros(codebook_size, dtype=torch.long)
        self.steps = 0

    def observe(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.detach().cpu().reshape(-1), minlength=self.codebook_size)
        self.steps += 1

    @property
    def due(self) -> bool:
        return self.steps >= self.window

    def reset(self) -> None:
        """Start a new counting window."""
        self.counts.zero_()
        self.steps = 0

    @torch.no_grad()
    def restart(self, quantizer: VectorQuantizer, latents: torch.Tensor, generator: torch.Generator) -> int:
        dead = torch.nonzero(self.counts == 0).reshape(-1)
        if dead.numel() > 0:
            choice = torch.randint(latents.shape[0], (dead.numel(),), generator=generator)
            weight = quantizer.embedding.weight
            weight[dead.to(weight.device)] = latents[choice.to(latents.device)].to(weight.dtype)
        self.reset()
        return int(dead.numel())


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> float:
    """Fraction of the codebook that ``indices`` (any shape, int64) hit at least once."""
    return float(torch.unique(indices.reshape(-1)).numel()) / codebook_size


def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB from a mean squared error over pixels in a range of width ``data_range`` ([-1, 1] -> 2)."""
    return 10.0 * math.log10(data_range**2 / max(mse, 1e-12))


def next_token_loss(teacher: LlamaGenGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of the teacher on token ids (B, T), class labels (B,).

    The official LlamaGen objective: the input is [class, tokens[:, :-1]] and logit row j predicts tokens[:, j], so
    every one of the T tokens is a target. In training mode the model drops labels to the null class with
    ``class_dropout_prob`` (classifier-free guidance training); call ``teacher.eval()`` for conditional evaluation.
    """
    logits = teacher(labels, tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as upstream LlamaGen: weight decay on tensors with ndim >= 2 only (no norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine_factor(progress: float, warmup_fraction: float, final_ratio: float = 0.0) -> float:
    """LR multiplier at training progress in [0, 1]: linear warm-up, then cosine decay to ``final_ratio``.

    Driven by a progress fraction rather than a step count so a training run can also be bounded by wall time
    (progress = max(step / steps, elapsed / time_budget)) and still end annealed.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return progress / warmup_fraction
    return decayed((progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-12), final_ratio)


def fp16_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in fp16 (halves the file); other tensors unchanged."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in model.state_dict().items()}


def save_fp16_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``{'model': fp16 state dict}`` (the official LlamaGen layout); float32 models load it with
    ``load_state_dict`` (which casts)."""
    return save_state_dict(fp16_state_dict(model), path, wrapper="model")


def update_training_record(path: str | Path, section: str, payload: dict) -> Path:
    """Set ``record[section] = payload`` in a JSON training record (created if missing; other sections kept)."""
    path = Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[section] = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
