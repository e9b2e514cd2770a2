"""The LlamaGen family behind the ``ARFamily`` protocol: one timestep = one token, raster order."""

from __future__ import annotations

import torch

from dd.models.codebook import nearest_code_indices
from dd.models.llamagen.generation import generate
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.tokenizer import VQTokenizer
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig


class LlamaGenFamily:
    """Tokenizer + teacher of a LlamaGen model.

    ``teacher_dtype`` runs teacher generation under autocast (the official teacher-involved script uses bf16);
    None keeps the weights' dtype.
    """

    def __init__(self, tokenizer: VQTokenizer, teacher: LlamaGenGPT, name: str = "llamagen",
                 teacher_dtype: torch.dtype | None = None) -> None:
        if tokenizer.codebook_size != teacher.vocab_size:
            raise ValueError(f"tokenizer codebook size {tokenizer.codebook_size} != teacher vocab {teacher.vocab_size}")
        self.name = name
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.teacher_dtype = teacher_dtype
        self.sequence_length = teacher.block_size
        self.token_dim = tokenizer.embed_dim
        self.num_timesteps = teacher.block_size
        self.num_classes = teacher.num_classes
        self.grid = (teacher.grid_size, teacher.grid_size)

    def data_length(self, t: int) -> int:
        if not 0 <= t <= self.num_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_timesteps}] (tokens of the sequence)")
        return int(t)

    def codebook(self) -> torch.Tensor:
        return self.tokenizer.codebook()

    @torch.no_grad()
    def teacher_generate(self, labels: torch.Tensor, start_t: int, end_t: int, prefix: torch.Tensor | None,
                         sampling: SamplingConfig, chooser: TokenChooser) -> torch.Tensor:
        prefix_ids = None
        if start_t > 0:
            if prefix is None:
                raise ValueError(f"start_t={start_t} needs a prefix of {start_t} tokens")
            prefix_ids = nearest_code_indices(prefix[:, :start_t], self.codebook())
        device_type = labels.device.type
        enabled = self.teacher_dtype is not None
        with torch.autocast(device_type, dtype=self.teacher_dtype or torch.bfloat16, enabled=enabled):
            result = generate(self.teacher, labels, end_t - start_t, sampling, chooser, prefix=prefix_ids)
        return result.tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, d) continuous tokens -> images (B, 3, H, W) in about [-1, 1] (differentiable: perceptual losses)."""
        return self.tokenizer.decode_tokens(tokens.float(), self.grid)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_indices(ids, self.grid)
