"""Autoregressive generation with the LlamaGen teacher: static KV cache, CFG batch doubling, pluggable chooser.

The loop follows the official ``generate`` / ``intermediate_generate`` schedule exactly: the first new token comes
from a causal prefill over [class, prefix] and is always guided; decode-loop iteration i (0-based) is guided unless
``cfg_interval > -1 and i > cfg_interval``. Unlike the official helper it supports an empty or non-empty prefix
with and without CFG and any number of new tokens >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dd.models.llamagen.fast import StaticDecoder
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig, combine_cfg, processed_log_probs


@dataclass(frozen=True)
class GenerationResult:
    """tokens (B, P + N) int64 including the prefix; step_logits (N, B, V) float32 (CFG-combined, before
    temperature and filtering) when recorded, else None."""

    tokens: torch.Tensor
    step_logits: torch.Tensor | None


def _guided(logits: torch.Tensor, batch: int, config: SamplingConfig, use_guidance: bool) -> torch.Tensor:
    if not config.uses_cfg:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return combine_cfg(cond, uncond, config.cfg_scale) if use_guidance else cond


def _double(x: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    return torch.cat([x, x]) if config.uses_cfg else x


@torch.no_grad()
def generate(model: LlamaGenGPT, labels: torch.Tensor, num_new_tokens: int, config: SamplingConfig,
             chooser: TokenChooser, prefix: torch.Tensor | None = None, record_logits: bool = False,
             cache_dtype: torch.dtype | None = None, decoder: StaticDecoder | None = None) -> GenerationResult:
    """Generate ``num_new_tokens`` image tokens after an optional prefix (B, P) of given ids.

    labels (B,) class ids. The chooser receives processed log-probabilities (B, V) and the 0-based index of the
    token being chosen. Without ``decoder`` (eager) the caches cover exactly this generation and are freed before
    returning; a :class:`~dd.models.llamagen.fast.StaticDecoder` runs the decode steps through its fast path over
    its own full-length caches, which it keeps for the next call.
    """
    batch = labels.shape[0]
    prefix_len = 0 if prefix is None else prefix.shape[1]
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens={num_new_tokens} must be >= 1")
    if prefix_len + num_new_tokens > model.block_size:
        raise ValueError(f"prefix {prefix_len} + new {num_new_tokens} tokens exceed block_size {model.block_size}")
    conditions = torch.cat([labels, torch.full_like(labels, model.null_class)]) if config.uses_cfg else labels
    if decoder is None:
        model.setup_caches(conditions.shape[0], 1 + prefix_len + num_new_tokens, cache_dtype)
        step_fn = model.decode_step
    else:
        decoder.prepare(conditions.shape[0], cache_dtype)
        step_fn = decoder
    out = torch.empty(batch, prefix_len + num_new_tokens, dtype=torch.long, device=labels.device)
    if prefix is not None:
        out[:, :prefix_len] = prefix
    recorded: list[torch.Tensor] = []
    try:
        logits = model.prefill(conditions, None if prefix is None else _double(prefix, config))
        for i in range(num_new_tokens):
            if i > 0:
                logits = step_fn(_double(out[:, prefix_len + i - 1], config), prefix_len + i)
            # decode-loop iteration i - 1 produced token i; the prefill (i = 0) is always guided
            use_guidance = i == 0 or not (config.cfg_interval > -1 and (i - 1) > config.cfg_interval)
            step = _guided(logits, batch, config, use_guidance)
            if record_logits:
                recorded.append(step.float())
            out[:, prefix_len + i] = chooser(processed_log_probs(step, config), prefix_len + i)
    finally:
        if decoder is None:
            model.clear_caches()
    return GenerationResult(out, torch.stack(recorded) if record_logits else None)
