"""(noise, tokens) pair generation: the teacher's AR loop with every categorical draw replaced by the
deterministic flow-matching map of the position's own noise token (method.md §3.1).

Pure torch. The Lightning task and the Hydra entry point only shard the work and write the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dd.flow import FlowMapConfig, map_noise_to_tokens
from dd.models.protocol import ARFamily
from dd.sampling.choosers import token_positions
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import per_sample_labels, per_sample_normal


class FlowChooser:
    """Token chooser that maps each chosen token's own noise ``noise[:, position]`` through the flow map of its
    processed teacher distribution: one token (log_probs (B, V)) or a whole scale at once (log_probs (B, n, V),
    positions ``position .. position + n - 1``; the flow map solves all n tokens together, chunked over rows).

    noise (B, L, d); codebook (V, d). Records the snapping residual of every mapped token (diagnostic).
    """

    def __init__(self, noise: torch.Tensor, codebook: torch.Tensor, config: FlowMapConfig) -> None:
        self.noise = noise
        self.codebook = codebook
        self.config = config
        self.residuals = torch.zeros(noise.shape[:2], dtype=torch.float32, device=noise.device)

    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor:
        where = token_positions(log_probs, position)
        result = map_noise_to_tokens(self.noise[:, where], log_probs, self.codebook, self.config)
        self.residuals[:, where] = result.snap_residual.float()
        return result.indices


@dataclass(frozen=True)
class PairBatch:
    """labels (B,), token ids (B, L), seeds (B,) (noise = per_sample_normal(seeds, (L, d))),
    max_snap_residual (B,) the largest endpoint-to-code distance over the sequence."""

    labels: torch.Tensor
    indices: torch.Tensor
    seeds: torch.Tensor
    max_snap_residual: torch.Tensor


def make_labels(seeds: Sequence[int], num_classes: int, mode: str | Sequence[int], sample_ids: Sequence[int]
                ) -> torch.Tensor:
    """Class labels for samples: "uniform" (per-sample seeded draw), "balanced" (i mod num_classes) or a list of
    class ids cycled over the sample index."""
    if mode == "uniform":
        return per_sample_labels(seeds, num_classes)
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in sample_ids], dtype=torch.long)
    if isinstance(mode, str):
        raise ValueError(f"labels={mode!r}: expected 'uniform', 'balanced' or a list of class ids")
    classes = [int(c) for c in mode]
    if not classes or any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"labels={classes}: every class id must be in 0..{num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in sample_ids], dtype=torch.long)


@torch.no_grad()
def generate_pair_batch(family: ARFamily, seeds: Sequence[int], labels: torch.Tensor, sampling: SamplingConfig,
                        flow: FlowMapConfig, device: torch.device | str = "cpu") -> PairBatch:
    """Run the teacher over the whole sequence, mapping each position's noise through the flow map."""
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim), device=device)
    chooser = FlowChooser(noise, family.codebook().to(device), flow)
    ids = family.teacher_generate(labels.to(device), 0, family.num_timesteps, None, sampling, chooser)
    return PairBatch(labels.cpu(), ids.cpu(), torch.tensor(list(seeds), dtype=torch.long),
                     chooser.residuals.amax(dim=1).cpu())
