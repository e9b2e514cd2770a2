"""LlamaGen class-conditional GPT teacher (``autoregressive/models/gpt.py``, ``Transformer``) in pure torch.

Sequence layout: slot 0 holds the class embedding, slot j >= 1 holds image token j - 1; the logits at slot j
predict image token j. Parameter names match the official ``c2i_*.pt["model"]`` state dicts (no ``freqs_cis``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dd.models.llamagen.layers import KVCache, LabelEmbedder, RMSNorm, TransformerBlock, rope_table_2d, swiglu_hidden_dim


class LlamaGenGPT(nn.Module):
    """The class-conditional LlamaGen GPT.

    Builder arguments are the official ``ModelArgs`` fields (``dim``, ``n_layer``, ``n_head``, ``n_kv_head``,
    ``multiple_of``, ``ffn_dim_multiplier``, ``rope_base``, ``norm_eps``, ``vocab_size``, ``num_classes``,
    ``class_dropout_prob``, ``block_size``, dropouts). Only ``cls_token_num = 1`` (class-conditional) is supported.
    """

    def __init__(self, *, dim: int, n_layer: int, n_head: int, vocab_size: int, num_classes: int, block_size: int,
                 n_kv_head: int | None = None, multiple_of: int = 256, ffn_dim_multiplier: float | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-5, class_dropout_prob: float = 0.1,
                 token_dropout_p: float = 0.0, resid_dropout_p: float = 0.0, cls_token_num: int = 1) -> None:
        super().__init__()
        if cls_token_num != 1:
            raise ValueError(f"cls_token_num={cls_token_num}: only class-conditional models (1 class slot) are supported")
        grid = math.isqrt(block_size)
        if grid * grid != block_size:
            raise ValueError(f"block_size={block_size} must be a square number (grid_size**2)")
        self.dim, self.n_layer, self.n_head = dim, n_layer, n_head
        self.n_kv_head = n_kv_head or n_head
        self.vocab_size, self.num_classes, self.block_size = vocab_size, num_classes, block_size
        self.grid_size = grid
        self.class_dropout_prob = class_dropout_prob
        self.cls_token_num = cls_token_num
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.cls_embedding = LabelEmbedder(num_classes, dim, with_null_row=class_dropout_prob > 0)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        hidden = swiglu_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.layers = nn.ModuleList(
            TransformerBlock(dim=dim, n_head=n_head, n_kv_head=self.n_kv_head, ffn_hidden=hidden, norm_eps=norm_eps,
                             dropout=resid_dropout_p)
            for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(grid, dim // n_head, rope_base, cls_token_num), persistent=False)
        self._cache_len = 0
        self.register_buffer("cache_positions", None, persistent=False)  # (max_seq,) slot indices, with the caches

    @property
    def null_class(self) -> int:
        """Index of the unconditional class row used by classifier-free guidance."""
        return self.num_classes

    # -- embeddings -------------------------------------------------------------------------------------------
    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> (B, 1, dim); in training mode labels are dropped to the null class w.p. class_dropout_prob."""
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.cls_embedding(labels)[:, None, :]

    def _run(self, h: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None,
             cache_mask: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        h = self.tok_dropout(h)
        rope = self.rope[input_pos]
        for layer in self.layers:
            h = layer(h, rope, input_pos, kv_len, cache_mask)
        return self.output(self.norm(h)).float() if head else self.norm(h)

    # -- full-sequence (teacher-forcing) path ---------------------------------------------------------------------
    def forward(self, labels: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: labels (B,), tokens (B, T) with T <= block_size -> logits (B, T + 1, V), float32.

        Row j of the output predicts image token j (row 0 = class slot). No KV cache is used or touched.
        """
        return self._teacher_forced(labels, tokens, head=True)

    def features(self, labels: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without the output layer: the normed hidden states (B, T + 1, dim) the logits come from."""
        return self._teacher_forced(labels, tokens, head=False)

    def _teacher_forced(self, labels: torch.Tensor, tokens: torch.Tensor | None, head: bool) -> torch.Tensor:
        h = self.class_embeddings(labels)
        if tokens is not None and tokens.shape[1] > 0:
            if tokens.shape[1] > self.block_size:
                raise ValueError(f"got {tokens.shape[1]} tokens but block_size is {self.block_size}")
            h = torch.cat([h, self.tok_embeddings(tokens)], dim=1)
        input_pos = torch.arange(h.shape[1], device=h.device)
        caches = [layer.attention.kv_cache for layer in self.layers]
        for layer in self.layers:
            layer.attention.kv_cache = None
        try:
            return self._run(h, input_pos, None, head=head)
        finally:
            for layer, cache in zip(self.layers, caches):
                layer.attention.kv_cache = cache

    # -- cached decoding path ------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_seq: int, dtype: torch.dtype | None = None, reuse: bool = False) -> None:
        """Allocate static KV caches for ``batch`` rows and ``max_seq`` positions (rounded up to a multiple of 8).

        ``reuse=True`` keeps caches of the same batch, length, dtype and device instead of allocating new ones:
        compiled and CUDA-graph decoding captured them by address (stale entries are masked, never read)."""
        max_seq = ((max_seq + 7) // 8) * 8
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        if reuse and self._caches_match(batch, max_seq, dtype, device):
            return
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, attn.n_kv_head, max_seq, attn.head_dim, dtype, device)
        self.register_buffer("cache_positions", torch.arange(max_seq, device=device), persistent=False)
        self._cache_len = max_seq

    def cache_state(self) -> tuple[tuple[KVCache | None, ...], torch.Tensor | None, int]:
        """The current caches (per-layer modules, slot indices, length): kept by a decoder to reinstall them."""
        return tuple(layer.attention.kv_cache for layer in self.layers), self.cache_positions, self._cache_len

    def install_cache_state(self, state: tuple[tuple[KVCache | None, ...], torch.Tensor | None, int]) -> None:
        """Reinstall caches returned by :meth:`cache_state` (the same tensors, so captured graphs stay valid)."""
        caches, positions, length = state
        for layer, cache in zip(self.layers, caches):
            layer.attention.kv_cache = cache
        self.cache_positions = positions
        self._cache_len = length

    def _caches_match(self, batch: int, max_seq: int, dtype: torch.dtype, device: torch.device) -> bool:
        cache = self.layers[0].attention.kv_cache
        return cache is not None and cache.k_cache.shape[0] == batch and cache.k_cache.shape[2] == max_seq \
            and cache.k_cache.dtype == dtype and cache.k_cache.device == device

    def clear_caches(self) -> None:
        """Drop the KV caches (generation leaves none behind; this frees them explicitly)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._cache_len = 0
        self.cache_positions = None

    def prefill(self, labels: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over [class, prefix tokens] that fills the caches; returns the last slot's logits (B, V)."""
        h = self.class_embeddings(labels)
        if prefix is not None and prefix.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(prefix)], dim=1)
        input_pos = torch.arange(h.shape[1], device=h.device)
        return self._run(h, input_pos, None)[:, -1]

    def decode_step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Feed tokens (B,) at sequence slot ``position`` using the caches; returns logits (B, V) for the next token.

        The slot index is a host integer, so attending to the filled part of the cache needs no device sync.
        """
        if not 0 < position < self._cache_len:
            raise RuntimeError(f"decode_step at slot {position} needs setup_caches() covering it and prefill() first")
        input_pos = torch.tensor([position], device=tokens.device)
        h = self.tok_embeddings(tokens[:, None])
        return self._run(h, input_pos, position + 1)[:, -1]

    def decode_step_static(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The capture-safe decode step: tokens (B,) at slot ``input_pos`` ((1,) int64 on the model's device) ->
        logits (B, V) float32.

        Attends over the whole static cache under the mask ``slot <= input_pos`` (the official full-cache
        attention), so every step has the same shapes and reads nothing on the host: the step that
        ``torch.compile`` and CUDA graphs capture (``dd.models.llamagen.fast``). Same logits as
        :meth:`decode_step` up to float rounding; needs ``setup_caches`` and ``prefill`` first (not checked here:
        a check would read the host).
        """
        h = self.tok_embeddings(tokens[:, None])
        cache_mask = (self.cache_positions <= input_pos)[None, None, None, :]
        return self._run(h, input_pos, None, cache_mask)[:, -1]
