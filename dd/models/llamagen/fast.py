"""Fast cached decoding for the LlamaGen teacher: the decode step over a full-length static KV cache, run eager,
compiled (``torch.compile``, ``reduce-overhead`` on CUDA) or replayed from a CUDA graph (:mod:`dd.acceleration`).

The eager default (:meth:`LlamaGenGPT.decode_step`) attends over the filled cache prefix, whose length grows every
step. A compiled or graphed step needs fixed shapes and no host reads, so :class:`StaticDecoder` runs
:meth:`LlamaGenGPT.decode_step_static` instead: every step attends over all ``block_size + 1`` slots (rounded up to
a multiple of 8) under the mask ``slot <= position``, as the official ``generate`` does. The caches are allocated
once per (batch, dtype, device) and reused by every later generation, so a graph captured for a batch size keeps
pointing at valid memory; under bf16 autocast they are stored in bf16 (the keys and values already are bf16
values, so this changes no result and halves the cache traffic).
"""

from __future__ import annotations

import torch

from dd.acceleration import CompileOptions, accelerate, active_autocast_dtype, check_fast_path
from dd.models.llamagen.gpt import LlamaGenGPT


class StaticDecoder:
    """Decode steps of one teacher through a fast path; call :meth:`prepare` before each generation.

    ``decoder(tokens (B,), position: int) -> logits (B, V)`` float32, owned by the caller (cloned out of the
    graph's static buffer)."""

    def __init__(self, model: LlamaGenGPT, fast_path: str = "compile",
                 compile_options: CompileOptions | None = None) -> None:
        self.model = model
        self.fast_path = check_fast_path(fast_path)
        self._step = accelerate(model.decode_step_static, fast_path, compile_options=compile_options,
                                clone_outputs=True, anchor=model.output.weight)
        self._cache_sets: dict[tuple[int, torch.dtype, torch.device], tuple] = {}
        self._slots: dict[torch.device, list[torch.Tensor]] = {}

    def prepare(self, batch: int, cache_dtype: torch.dtype | None = None) -> None:
        """Install full-length caches for ``batch`` rows (the ones of an earlier call with the same batch, dtype and
        device, if any). ``cache_dtype`` None: the autocast dtype when autocast is on, else the weights' dtype."""
        weight = self.model.output.weight
        dtype = cache_dtype or active_autocast_dtype(weight.device.type) or weight.dtype
        key = (batch, dtype, weight.device)
        if key in self._cache_sets:
            self.model.install_cache_state(self._cache_sets[key])
            return
        self.model.setup_caches(batch, self.model.block_size + 1, dtype)
        self._cache_sets[key] = self.model.cache_state()

    def release(self) -> None:
        """Free every cache set (and the model's current caches); the next :meth:`prepare` allocates again."""
        self._cache_sets.clear()
        self.model.clear_caches()
        reset = getattr(self._step, "reset", None)
        if reset is not None:
            reset()  # captured graphs point at the freed caches

    def _slot(self, position: int, device: torch.device) -> torch.Tensor:
        """(1,) int64 slot index on ``device``, made once: no host-to-device copy per step, and a separate tensor
        rather than a view (views would make compiled code guard on their offsets)."""
        slots = self._slots.get(device)
        if slots is None:
            slots = self._slots[device] = [torch.tensor([p], device=device) for p in range(self.model.block_size + 1)]
        return slots[position]

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        positions = self.model.cache_positions
        if positions is None or not 0 < position <= self.model.block_size:
            raise RuntimeError(f"decode at slot {position} needs prepare() and prefill() first")
        return self._step(tokens, self._slot(position, tokens.device))
