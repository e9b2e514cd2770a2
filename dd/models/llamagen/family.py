"""The LlamaGen family behind the ``ARFamily`` protocol: one timestep = one token, raster order."""

from __future__ import annotations

import torch

from dd.acceleration import CompileOptions, check_fast_path
from dd.models.codebook import nearest_code_indices
from dd.models.llamagen.fast import StaticDecoder
from dd.models.llamagen.generation import generate
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.tokenizer import VQTokenizer
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig


class LlamaGenFamily:
    """Tokenizer + teacher of a LlamaGen model.

    ``teacher_dtype`` runs teacher generation under autocast (the official teacher-involved script uses bf16);
    None keeps the weights' dtype. ``fast_path`` (:data:`dd.acceleration.FAST_PATHS`) chooses how the cached decode
    steps run: ``"eager"`` (the official-equivalent loop), ``"compile"`` or ``"cuda_graph"``
    (:class:`~dd.models.llamagen.fast.StaticDecoder`, same tokens).
    """

    def __init__(self, tokenizer: VQTokenizer, teacher: LlamaGenGPT, name: str = "llamagen",
                 teacher_dtype: torch.dtype | None = None, fast_path: str = "eager") -> None:
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
        self.set_fast_path(fast_path)

    def set_fast_path(self, fast_path: str, compile_options: CompileOptions | None = None) -> None:
        """How teacher decode steps run from now on (a new decoder: earlier compiled programs and graphs go)."""
        previous = getattr(self, "_decoder", None)
        if previous is not None:
            previous.release()
        self.fast_path = check_fast_path(fast_path)
        self._decoder = None if fast_path == "eager" else StaticDecoder(self.teacher, fast_path, compile_options)

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
            result = generate(self.teacher, labels, end_t - start_t, sampling, chooser, prefix=prefix_ids,
                              decoder=self._decoder)
        return result.tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, d) continuous tokens -> images (B, 3, H, W) in about [-1, 1] (differentiable: perceptual losses)."""
        return self.tokenizer.decode_tokens(tokens.float(), self.grid)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_indices(ids, self.grid)
