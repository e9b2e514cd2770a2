"""Next-scale generation with the VAR teacher: KV cache, CFG ramp over scales, per-scale parallel token choice.

Follows the official ``autoregressive_infer_cfg`` and ``intermediate_sample`` (architectures.md §5.7, §7.4):

* guidance at scale si: ``t = cfg * si / (SN - 1)``, ``logits = (1 + t) * cond - t * uncond`` (cond rows first);
  ``sampling.cfg_scale`` is VAR's ``cfg`` (0 disables guidance and the batch doubling, with identical results);
* filtering: VAR's top-k (k clamped to V) and nucleus rule (ascending sort, entries whose cumulative softmax is
  <= 1 - top_p are removed, the largest always kept); ``top_p = 1.0`` is "off" (the official code uses 0);
* all tokens of a scale are chosen at once: the chooser receives log-probabilities (B, pn^2, V) and the flat
  position of the scale's first token, and returns (B, pn^2) ids;
* a prefix of given scales (``intermediate_sample``) is run in one pass over [sos, token maps of scales
  1..start]; the official pipeline runs it **without** an attention mask (prefix tokens attend across scales,
  ``prefix_attention="bidirectional"``); ``"block_causal"`` uses the training mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dd.models.var.layers import KVCache
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig

PREFIX_ATTENTION = ("bidirectional", "block_causal")


@dataclass(frozen=True)
class VARGenerationResult:
    """indices (B, n) flat ids of scales 0..end-1 (prefix included); f_hat (B, Cvae, h, w) after the last generated
    scale; step_logits: per generated scale the CFG-combined logits (B, pn^2, V) before filtering, if recorded."""

    indices: torch.Tensor
    f_hat: torch.Tensor
    step_logits: tuple[torch.Tensor, ...] | None


def var_filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """VAR's ``sample_with_top_k_top_p_`` filter on a copy: (..., V) -> (..., V) with -inf for removed tokens."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = logits.topk(k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1, descending=False)
        remove_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def guidance_weight(cfg: float, scale_index: int, num_scales: int) -> float:
    """t of the linear CFG ramp: 0 at the first scale, ``cfg`` at the last."""
    return cfg * scale_index / (num_scales - 1) if num_scales > 1 else cfg


def guided_logits(logits: torch.Tensor, batch: int, cfg: float, scale_index: int, num_scales: int) -> torch.Tensor:
    """(2B, n, V) -> (B, n, V) with VAR's CFG formula; (B, n, V) passes through when guidance is off."""
    if logits.shape[0] == batch:
        return logits
    t = guidance_weight(cfg, scale_index, num_scales)
    return (1 + t) * logits[:batch] - t * logits[batch:]


def var_log_probs(guided: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, VAR filtering, log-softmax: the distribution the chooser (and the flow map) receive."""
    logits = guided / max(sampling.temperature, 1e-5) if sampling.temperature != 1.0 else guided
    return torch.log_softmax(var_filter_logits(logits, sampling.top_k, sampling.top_p).float(), dim=-1)


class _ScaleRunner:
    """Feeds token maps through the teacher with per-block KV caches, conditioned on (possibly doubled) classes."""

    def __init__(self, teacher: VARTransformer, labels: torch.Tensor, guided: bool) -> None:
        self.teacher = teacher
        self.batch = labels.shape[0]
        conditions = torch.cat([labels, torch.full_like(labels, teacher.null_class)]) if guided else labels
        self.cond = teacher.class_emb(conditions)
        self.caches = [KVCache() for _ in teacher.blocks]

    def first_map(self) -> torch.Tensor:
        return self.teacher.sos(self.cond) + self.teacher.level_position(0, 1)

    def next_map(self, next_latent: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Token map of scale ``scale_index`` from the area-downsampled f_hat (B, Cvae, pn, pn), both CFG halves."""
        start, stop = self.teacher.scale_slices[scale_index]
        flat = next_latent.flatten(2).transpose(1, 2)
        x = self.teacher.word_embed(flat) + self.teacher.level_position(start, stop)
        return x.repeat(self.cond.shape[0] // self.batch, 1, 1)

    def logits(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.teacher.logits(self.teacher.run_blocks(x, self.cond, attn_bias, self.caches), self.cond)


def _embed_scale(vqvae: MultiScaleVQVAE, ids: torch.Tensor, side: int) -> torch.Tensor:
    """(B, pn^2) ids -> (B, Cvae, pn, pn) codebook rows in raster order."""
    return vqvae.codebook()[ids].transpose(1, 2).reshape(ids.shape[0], -1, side, side)


def _check_range(teacher: VARTransformer, start: int, end: int, prefix: torch.Tensor | None) -> None:
    if not 0 <= start < end <= teacher.num_scales:
        raise ValueError(f"scales {start}..{end - 1}: need 0 <= start_scale < end_scale <= {teacher.num_scales}")
    needed = teacher.scale_slices[start][0]
    if start > 0 and (prefix is None or prefix.shape[1] != needed):
        got = None if prefix is None else tuple(prefix.shape)
        raise ValueError(f"start_scale={start} needs prefix ids of the first {start} scales, shape (B, {needed}); "
                         f"got {got}")


@torch.no_grad()
def var_generate(teacher: VARTransformer, vqvae: MultiScaleVQVAE, labels: torch.Tensor, sampling: SamplingConfig,
                 chooser: TokenChooser, *, start_scale: int = 0, end_scale: int | None = None,
                 prefix: torch.Tensor | None = None, prefix_attention: str = "bidirectional",
                 record_logits: bool = False) -> VARGenerationResult:
    """Generate scales ``start_scale .. end_scale - 1`` (default: all) after the given prefix ids (B, n_prefix).

    labels (B,) class ids. Without a prefix this is ``autoregressive_infer_cfg``; with one, ``intermediate_sample``.
    """
    end = teacher.num_scales if end_scale is None else int(end_scale)
    _check_range(teacher, start_scale, end, prefix)
    if prefix_attention not in PREFIX_ATTENTION:
        raise ValueError(f"prefix_attention={prefix_attention!r}: expected one of {PREFIX_ATTENTION}")
    batch, side = labels.shape[0], teacher.patch_nums[-1]
    runner = _ScaleRunner(teacher, labels, guided=sampling.cfg_scale != 0)
    f_hat = torch.zeros(batch, teacher.z_channels, side, side, device=labels.device)
    x = runner.first_map()
    chosen = [] if prefix is None else [prefix]
    for si in range(start_scale):  # the prefix maps, fed in one pass below
        begin, stop = teacher.scale_slices[si]
        f_hat, next_latent = vqvae.next_autoregressive_input(
            si, f_hat, _embed_scale(vqvae, prefix[:, begin:stop], teacher.patch_nums[si]))
        x = torch.cat([x, runner.next_map(next_latent, si + 1)], dim=1)
    bias = None
    if start_scale > 0 and prefix_attention == "block_causal":
        bias = teacher.attn_bias_for_masking[:, :, :x.shape[1], :x.shape[1]]
    recorded = []
    for si in range(start_scale, end):
        begin, stop = teacher.scale_slices[si]
        logits = runner.logits(x, bias)[:, -(stop - begin):]
        bias = None  # cached decoding: each scale sees every cached key and its own scale
        guided = guided_logits(logits, batch, sampling.cfg_scale, si, teacher.num_scales)
        if record_logits:
            recorded.append(guided.float())
        ids = chooser(var_log_probs(guided, sampling), begin)
        chosen.append(ids)
        f_hat, next_latent = vqvae.next_autoregressive_input(si, f_hat, _embed_scale(vqvae, ids, teacher.patch_nums[si]))
        if si + 1 < end:
            x = runner.next_map(next_latent, si + 1)
    return VARGenerationResult(torch.cat(chosen, dim=1), f_hat, tuple(recorded) if record_logits else None)
