"""The small protocol through which the rest of dd sees a model family (LlamaGen, VAR).

A *timestep* t counts AR steps already taken: tokens for LlamaGen (0..256), scales for VAR (0..10). X_t holds data
(codebook vectors) for the first ``data_length(t)`` tokens and the original noise for the rest. Token sequences are
flat (B, L, d): raster order for LlamaGen, scale after scale (each in raster order) for VAR. Nothing outside
``dd/models/<family>/`` branches on the family: everything it needs is here, plus the preset spec's
``num_timesteps`` / ``sequence_length`` / ``num_classes`` / ``timestep_unit`` / ``export_keys`` and its builders.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig


@runtime_checkable
class DDStudent(Protocol):
    """What samplers and training need of a DD student. ``codebook`` (V, d) is the buffer predictions snap to."""

    codebook: torch.Tensor

    def num_data_tokens(self, t: torch.Tensor | int) -> torch.Tensor:
        """Timesteps -> number of leading data tokens (elementwise); also converts ``split`` to a position."""
        ...

    def nearest_indices(self, x: torch.Tensor) -> torch.Tensor: ...

    def perturb(self, data: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor: ...

    def final_predict(self, x_t: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | int
                      ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def final_sequence(self, tokens: torch.Tensor, logits: torch.Tensor, split: int) -> torch.Tensor: ...

    def set_fast_path(self, fast_path: str, dtype: str | torch.dtype | None = None) -> None:
        """Inference only: run the trunk of ``final_predict`` eager, compiled or as a CUDA graph
        (:data:`dd.acceleration.FAST_PATHS`), optionally under an autocast dtype; same tokens as eager."""
        ...


@runtime_checkable
class ARFamily(Protocol):
    """Teacher + tokenizer of one family, seen through sequence-level operations. ``tokenizer`` and ``teacher`` are
    the underlying modules (Lightning tasks register them so they move to the device)."""

    name: str
    tokenizer: torch.nn.Module
    teacher: torch.nn.Module
    sequence_length: int  # L: tokens per image
    token_dim: int  # d: dimension of a codebook vector / noise token
    num_timesteps: int  # AR steps per image (t ranges over 0..num_timesteps)
    num_classes: int

    def data_length(self, t: int) -> int:
        """Number of leading data tokens at timestep t."""
        ...

    def codebook(self) -> torch.Tensor:
        """(V, d) codebook vectors as the student and the flow map see them."""
        ...

    def teacher_generate(self, labels: torch.Tensor, start_t: int, end_t: int, prefix: torch.Tensor | None,
                         sampling: SamplingConfig, chooser: TokenChooser) -> torch.Tensor:
        """Continue from ``prefix`` (B, data_length(start_t), d) codebook vectors (None when start_t = 0) up to
        ``end_t``; returns token ids (B, data_length(end_t))."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Continuous token sequence (B, L, d) -> images (B, 3, H, W) in about [-1, 1]; differentiable."""
        ...

    def teacher_log_probs(self, labels: torch.Tensor, ids: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """Teacher forcing: (B, L) ids -> (B, L, V) float32 log-probabilities of the distribution teacher sampling
        (``teacher_generate`` with ``sampling``: CFG as its sampler applies it, temperature, top-k, top-p; -inf
        where filtered) draws token i from, given the ids of the earlier timesteps. No gradient (DD2)."""
        ...

    def feature_trunk(self) -> torch.nn.Module:
        """A new trainable copy of the teacher without its logits layer (DD2's AR-diffusion trunk): a module with
        ``feature_dim`` and ``forward(labels (B,), ids (B, L)) -> (B, L, feature_dim)``, the hidden state the
        teacher's logits for token i come from (it sees only the ids of earlier timesteps); no label dropout."""
        ...

    def student_weights_from_trunk(self, student: torch.nn.Module, trunk: torch.nn.Module
                                   ) -> dict[str, torch.Tensor]:
        """DD2's ``generator_init=ar_diffusion``: the entries of ``student``'s state dict that DD's initialisation
        from the teacher fills, taken from ``trunk`` (a :meth:`feature_trunk`, e.g. fine-tuned by GTS) instead,
        for ``dd.checkpoint.load_entries(student, weights)``. The logits head, which a trunk lacks, is not among
        them; a table the initialisation fills only in part keeps ``student``'s values elsewhere."""
        ...

    def set_fast_path(self, fast_path: str) -> None:
        """How teacher generation runs its steps from now on (:data:`dd.acceleration.FAST_PATHS`); the tokens are
        the eager path's. A family may run some of its loop eager whatever the setting (it says so)."""
        ...
