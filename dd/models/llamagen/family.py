"""The LlamaGen family behind the ``ARFamily`` protocol: one timestep = one token, raster order."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dd.acceleration import CompileOptions, check_fast_path
from dd.models.codebook import nearest_code_indices
from dd.models.llamagen.fast import StaticDecoder
from dd.models.llamagen.generation import generate
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.tokenizer import VQTokenizer
from dd.sampling.choosers import TokenChooser
from dd.sampling.logits import SamplingConfig, combine_cfg, processed_log_probs


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

    @torch.no_grad()
    def teacher_log_probs(self, labels: torch.Tensor, ids: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """One causal pass over [class, ids[:, :-1]] (CFG-doubled when guided); position i uses the guidance rule of
        ``generate`` (the prefill is always guided, decode iteration i - 1 unless past ``cfg_interval``)."""
        batch, length = ids.shape
        teacher = self.teacher
        was_training = teacher.training
        teacher.eval()  # no label dropout
        try:
            conditions = torch.cat([labels, torch.full_like(labels, teacher.null_class)]) if sampling.uses_cfg \
                else labels
            inputs = torch.cat([ids, ids])[:, :-1] if sampling.uses_cfg else ids[:, :-1]
            enabled = self.teacher_dtype is not None
            with torch.autocast(labels.device.type, dtype=self.teacher_dtype or torch.bfloat16, enabled=enabled):
                logits = teacher(conditions, inputs).float()  # (B', L, V): slot j predicts token j
        finally:
            teacher.train(was_training)
        if sampling.uses_cfg:
            cond, uncond = logits[:batch], logits[batch:]
            guided = combine_cfg(cond, uncond, sampling.cfg_scale)
            if sampling.cfg_interval > -1:
                position = torch.arange(length, device=ids.device)
                use = (position == 0) | ((position - 1) <= sampling.cfg_interval)
                guided = torch.where(use[None, :, None], guided, cond)
            logits = guided
        return processed_log_probs(logits, sampling)

    def feature_trunk(self) -> torch.nn.Module:
        return LlamaGenFeatureTrunk(self.teacher)

    def student_weights_from_trunk(self, student: torch.nn.Module, trunk: torch.nn.Module
                                   ) -> dict[str, torch.Tensor]:
        """Class table, blocks and final norm of the trunk's teacher copy (the student's names are the teacher's)."""
        return student.weights_from_teacher(trunk.model.state_dict(), head=False)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, d) continuous tokens -> images (B, 3, H, W) in about [-1, 1] (differentiable: perceptual losses)."""
        return self.tokenizer.decode_tokens(tokens.float(), self.grid)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_indices(ids, self.grid)


class LlamaGenFeatureTrunk(nn.Module):
    """DD2's AR-diffusion trunk: a trainable copy of the teacher GPT without its output layer and label dropout;
    ``forward(labels, ids)`` -> (B, L, dim), row i from the class and ids before i (the slot whose logits predict i)."""

    def __init__(self, teacher: LlamaGenGPT) -> None:
        super().__init__()
        model = copy.deepcopy(teacher).requires_grad_(True)
        model.class_dropout_prob = 0.0
        del model.output
        self.model = model
        self.feature_dim = teacher.dim

    def forward(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model.features(labels, ids[:, :-1])
