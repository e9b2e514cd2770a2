"""Opt-in fast paths for the hot inference loops: a callable runs eager, compiled or captured as a CUDA graph.

On a GPU the AR teacher's decode step and the DD student forward are bound by kernel-launch latency, not arithmetic
(GPT-L: 24 layers x about 15 kernels per token). Removing the launches is what brings a 256-step teacher under a
second and a one-step student to milliseconds. Three settings, the same everywhere in dd (``fast_path``):

* ``"eager"``: the plain PyTorch call (the default; the official-equivalent loop);
* ``"compile"``: ``torch.compile`` of the callable with static shapes; on CUDA with ``mode="reduce-overhead"``
  (Inductor kernels replayed from CUDA graphs), elsewhere ``mode="default"``;
* ``"cuda_graph"``: :class:`CudaGraphCallable` captures the eager kernels once per input signature (shapes, dtypes,
  device, autocast state) and replays them; CUDA only, refused on other devices with :class:`FastPathError`.

A callable is fit for a fast path when it is *capture-safe*: fixed shapes for fixed input shapes, no host
synchronisation (``.item()``, ``bool(tensor)``, data-dependent Python branches), state only in tensors that keep
their storage (static KV caches). The callers (the LlamaGen decode step over the static cache, the students'
trunk forwards, the flow map's ODE solve) are written that way; validation that needs the host happens before the
call.

Graph outputs live in static buffers that the next replay overwrites: :class:`CudaGraphCallable` clones them when
asked (``clone_outputs=True``), callers that consume the outputs immediately skip the copy.

``DD_COMPILE_BACKEND`` (environment) overrides the default ``torch.compile`` backend (``inductor``): the tests and
the CPU dry run of ``scripts/device_check.sh`` use ``aot_eager`` (full Dynamo capture and functionalisation, no code
generation: seconds instead of the ~20 s first Inductor compile on a small CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

FAST_PATHS = ("eager", "compile", "cuda_graph")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FastPathError(RuntimeError):
    """A fast path that cannot run here (e.g. CUDA graphs without CUDA), with the alternative in the message."""


def check_fast_path(fast_path: str) -> str:
    """Validate a ``fast_path`` setting; returns it."""
    if fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path={fast_path!r}: expected one of {FAST_PATHS}")
    return fast_path


def require_cuda_graphs(where: str = "fast_path='cuda_graph'") -> None:
    """Raise :class:`FastPathError` unless CUDA graphs can be captured in this process."""
    if not torch.cuda.is_available():
        raise FastPathError(f"{where} captures CUDA graphs and needs a CUDA device, but torch sees none "
                            f"(torch {torch.__version__}); use fast_path='compile' or 'eager' on this machine")


def autocast_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` / ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a dtype) -> torch dtype or None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected null or one of {tuple(_DTYPES)}")
    return _DTYPES[name]


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)`` when ``dtype`` is a low precision, else a no-op context (the caller's
    own autocast state, if any, stays in force). float32 means "no autocast"."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast lowers to on ``device_type`` right now, or None when autocast is off there."""
    try:
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        cuda = device_type == "cuda"
        enabled = torch.is_autocast_enabled() if cuda else torch.is_autocast_cpu_enabled()
        dtype = torch.get_autocast_gpu_dtype() if cuda else torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off: code that must run in the dtype it chose (the flow map, nearest-code search) stays there
    even when a caller (Lightning ``bf16-mixed``, ``teacher_dtype``) runs it under autocast."""
    with torch.autocast(device_type, enabled=False):
        yield


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` settings of a fast path.

    mode: None chooses ``"reduce-overhead"`` on CUDA (CUDA graphs of the Inductor kernels) and ``"default"``
        elsewhere. backend: None reads ``DD_COMPILE_BACKEND`` (default ``"inductor"``). dynamic: False
        specialises on shapes (one graph per batch size, as CUDA graphs need); None lets torch mark a changing
        dimension dynamic after the first recompile (the flow map, whose row count varies by scale).
        fullgraph: True turns any graph break into an error (tests prove the callers capture-safe with it).
    """

    mode: str | None = None
    backend: str | None = None
    dynamic: bool | None = False
    fullgraph: bool = False

    def resolved_backend(self) -> str:
        return self.backend or os.environ.get("DD_COMPILE_BACKEND", "inductor")

    def resolved_mode(self, device_type: str) -> str | None:
        if self.resolved_backend() != "inductor":
            return None  # modes are Inductor options
        return self.mode or ("reduce-overhead" if device_type == "cuda" else "default")


def _cuda_mark_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Tell CUDA-graph trees that a new invocation starts (outputs of the previous one may be overwritten)."""
    def call(*args: Any) -> Any:
        if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)
    return call


def compile_callable(fn: Callable[..., Any], device_type: str, options: CompileOptions | None = None
                     ) -> Callable[..., Any]:
    """``torch.compile`` of ``fn`` with :class:`CompileOptions` (mode chosen for ``device_type``)."""
    options = options or CompileOptions()
    mode = options.resolved_mode(device_type)
    compiled = torch.compile(fn, backend=options.resolved_backend(), mode=mode, dynamic=options.dynamic,
                             fullgraph=options.fullgraph)
    return _cuda_mark_step(compiled) if mode == "reduce-overhead" else compiled


# -- CUDA graphs ---------------------------------------------------------------------------------------------------
def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    parts: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.dtype, str(a.device)))
        else:
            parts.append(("const", a))
    parts.append(("autocast", active_autocast_dtype("cuda")))
    return tuple(parts)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise TypeError(f"a graphed callable must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _restructure(template: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(template, torch.Tensor):
        return tensors[0]
    return type(template)(tensors)


class _Graph:
    """One captured graph: static inputs the caller's tensors are copied into, static outputs replay writes."""

    def __init__(self, inputs: list[Any], outputs: Any, replay: Callable[[], None]) -> None:
        self.inputs, self.outputs, self.replay = inputs, outputs, replay


def _capture_cuda(fn: Callable[..., Any], static_inputs: list[Any], warmup: int) -> tuple[Any, Callable[[], None]]:
    """Warm up on a side stream (lazy init, cuBLAS workspaces, allocator), then capture one call of ``fn``.

    Each graph gets its own memory pool: graphs of different signatures may then be replayed in any order."""
    device = next((t.device for t in static_inputs if isinstance(t, torch.Tensor) and t.is_cuda), None)
    # autocast's weight cache would let the capture read the bf16 weight copies an earlier call made, which the
    # outermost autocast frees on exit: replays would then read freed memory. Without the cache the casts are
    # recorded in the graph and replayed with it.
    dtype = active_autocast_dtype("cuda")
    no_cache = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None \
        else contextlib.nullcontext()
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext(), no_cache:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*static_inputs)
    return outputs, graph.replay


class CudaGraphCallable:
    """Replays ``fn`` from a CUDA graph captured on the first call with each input signature.

    ``fn`` takes tensors (and hashable constants) and returns a tensor or a tuple of tensors; it must be
    capture-safe (see the module docstring). Each call copies its tensor arguments into the captured graph's static
    inputs, replays, and returns the static outputs (cloned when ``clone_outputs``: otherwise the next call
    overwrites them). Side effects on persistent tensors (a static KV cache written at a position given as a tensor)
    are replayed too; the warm-up and capture run the call with the first call's own inputs, so such writes stay
    idempotent. State captured by address (parameters, buffers, caches) must not be reallocated afterwards:
    the graphs are dropped when the first parameter's storage moves (``module.to(...)``) or by :meth:`reset`.
    """

    def __init__(self, fn: Callable[..., Any], *, clone_outputs: bool = False, warmup: int = 2,
                 anchor: torch.Tensor | None = None, _capture: Callable[..., tuple[Any, Callable[[], None]]] | None = None
                 ) -> None:
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self.anchor = anchor
        self._anchor_ptr = None if anchor is None else anchor.data_ptr()
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._capture = _capture or _capture_cuda

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Forget every captured graph (the next call captures again)."""
        self._graphs.clear()

    def _check_device(self, args: tuple[Any, ...]) -> None:
        if self._capture is _capture_cuda:
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if devices - {"cuda"}:
                raise FastPathError(f"fast_path='cuda_graph' got tensors on {sorted(devices)}: CUDA graphs need every "
                                    f"input on a CUDA device; use fast_path='compile' or 'eager' for "
                                    f"{sorted(devices - {'cuda'})}")

    def __call__(self, *args: Any) -> Any:
        if self.anchor is not None and self.anchor.data_ptr() != self._anchor_ptr:
            self.reset()
            self._anchor_ptr = self.anchor.data_ptr()
        key = _signature(args)
        graph = self._graphs.get(key)
        if graph is None:
            self._check_device(args)
            inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            outputs, replay = self._capture(self.fn, inputs, self.warmup)
            graph = self._graphs[key] = _Graph(inputs, outputs, replay)
        else:
            for static, a in zip(graph.inputs, args):
                if isinstance(a, torch.Tensor):
                    static.copy_(a)
        graph.replay()
        if not self.clone_outputs:
            return graph.outputs
        return _restructure(graph.outputs, [t.clone() for t in _flatten(graph.outputs)])


def accelerate(fn: Callable[..., Any], fast_path: str, *, device_type: str | None = None,
               compile_options: CompileOptions | None = None, clone_outputs: bool = False,
               anchor: torch.Tensor | None = None) -> Callable[..., Any]:
    """``fn`` itself (``"eager"``), compiled (``"compile"``) or CUDA-graphed (``"cuda_graph"``).

    ``device_type`` picks the compile mode (None: ``"cuda"`` when available); ``clone_outputs`` and ``anchor`` as
    in :class:`CudaGraphCallable` (the compiled path clones under ``reduce-overhead`` for the same reason)."""
    check_fast_path(fast_path)
    if fast_path == "eager":
        return fn
    if fast_path == "cuda_graph":
        require_cuda_graphs()
        return CudaGraphCallable(fn, clone_outputs=clone_outputs, anchor=anchor)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    compiled = compile_callable(fn, device_type, compile_options)
    if not clone_outputs:
        return compiled
    return lambda *args: _restructure_clone(compiled(*args))


def _restructure_clone(out: Any) -> Any:
    return _restructure(out, [t.clone() for t in _flatten(out)])


class FastForward:
    """Mixin for inference modules (the DD students): :meth:`set_fast_path` routes :meth:`fast_call` through a fast
    path of the class's capture-safe trunk, ``_fast_target`` (a bound method). Falls back to the eager trunk while
    the module trains or gradients are enabled (graphs and ``reduce-overhead`` are inference-only here)."""

    _fast_path: str = "eager"
    _fast_runner: Callable[..., Any] | None = None
    _fast_dtype: torch.dtype | None = None

    def _fast_target(self, *args: Any) -> Any:
        raise NotImplementedError

    @property
    def fast_path(self) -> str:
        return self._fast_path

    def set_fast_path(self, fast_path: str, dtype: str | torch.dtype | None = None,
                      compile_options: CompileOptions | None = None) -> None:
        """Choose how the trunk runs at inference: ``fast_path`` in :data:`FAST_PATHS`; ``dtype`` an autocast dtype
        for the trunk (None: the caller's precision)."""
        anchor = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        self._fast_runner = None if fast_path == "eager" else accelerate(
            self._fast_target, fast_path, compile_options=compile_options, anchor=anchor)
        self._fast_path = check_fast_path(fast_path)
        self._fast_dtype = autocast_dtype(dtype)

    def fast_call(self, *args: torch.Tensor) -> Any:
        """The trunk through the chosen fast path and autocast dtype (tensors in, tensors out)."""
        device_type = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        runner = self._fast_runner
        if runner is None or self.training or torch.is_grad_enabled():  # type: ignore[attr-defined]
            runner = self._fast_target
        with autocast(device_type, self._fast_dtype):
            return runner(*args)
