"""Per-token flow-matching map: Gaussian noise -> codebook token (method.md §2).

For one autoregressive position the teacher gives a next-token distribution ``p`` over a codebook
``C = {c_1..c_V} ⊂ R^d``. Distilled Decoding replaces *sampling* from ``p`` by a deterministic map
``eps -> token``, obtained by integrating the flow-matching ODE that transports ``N(0, I_d)`` to the
mixture of Dirac deltas ``pi = sum_k p_k delta(c_k)``.

Path (rectified flow, t = 1 noise, t = 0 data)::

    x_t = (1 - t) c + t eps,        c ~ pi,  eps ~ N(0, I_d)

Closed form of the marginal field (method.md §2.2)::

    c_hat(x, t) = sum_k w_k(x, t) c_k,
    w(x, t)     = softmax_k( log p_k - ||x - (1 - t) c_k||^2 / (2 t^2) ),
    v(x, t)     = dx/dt = (x - c_hat(x, t)) / t.

Because ``||x - a c_k||^2 = ||x||^2 - 2 a x.c_k + a^2 ||c_k||^2`` and ``||x||^2`` is constant in ``k``,
the softmax logits are computed as ``log p_k + (a x.c_k - a^2 ||c_k||^2 / 2) / t^2`` with ``a = 1 - t``:
one ``(n, d) x (d, V)`` matmul, never an ``(n, V, d)`` tensor.

Solvers (all in the data-prediction form, i.e. they only ever evaluate ``c_hat``):

* ``"euler"``: Euler on the field above in its exponential-integrator form, which is exactly the
  DDIM / DPM-Solver-1 update ``x_s = (s/t) x_t + (1 - s/t) c_hat(x_t, t)``. One evaluation per step.
* ``"dpmpp_2m"``: DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with ``alpha_t = 1 - t``, ``sigma_t = t``,
  ``lambda_t = log((1 - t)/t)``. Same update with ``c_hat`` replaced by the linear extrapolation
  ``(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1}/h_i``, ``h_i = lambda_{t_{i+1}} - lambda_{t_i}``.
  First order at the first step (``lambda_1 = -inf``) and at the last step (``lambda_0 = +inf``,
  "lower order final"). One evaluation per step.
* ``"heun"``: Heun (trapezoidal predictor-corrector) on ``v``; the last step (to ``t = 0``) is Euler
  (EDM convention). Two evaluations per step except the last.

Every solver's final step is the first-order step to ``s = 0``, i.e. ``x_0 = c_hat(x_{t_1}, t_1)``:
no division by ``t = 0`` ever happens. The start ``t = 1`` is also safe: ``a = 0`` there, the
logits reduce to ``log p`` and ``c_hat(x, 1) = E_p[c]``.

The returned token is the nearest codebook row (squared L2, lowest index on ties) of the ODE endpoint;
``snap_residual`` is the distance to it (≈ 0 when the solver is converged, see ``docs/flow_map_study.md``).

Support restriction (``FlowMapConfig.support``): a code with ``log p_k = -inf`` (filtered by top-k / top-p) has
posterior weight exactly 0 at every t, so it contributes nothing to ``c_hat``. When the largest support ``k`` of a
row chunk is small, each row's solve runs over its own support only: the distance terms come from the same
``(n, d + 1) x (d + 1, V)`` matmul, gathered at the row's support columns and added to its log-probs there (rows
with a smaller support are padded to ``k`` with log-prob ``-inf``: weight exactly 0), the softmax runs over ``k``
entries and the weighted sum is an ``embedding_bag`` over the support rows of the codebook (for codebooks of <=
``GATHER_MAX_DIM`` dimensions, every row's support columns of the codebook are instead gathered once per call and each
step is two batched matrix-vector products over them, with no full-width matmul). Same ODE, same logits;
only the rounding of sums differs (endpoints equal within float rounding, same tokens in practice). The endpoint is
snapped over the **whole** codebook in both forms, as the dense solve always did, so even an unconverged endpoint
(between codes) gets the dense solve's token.

Everything here is pure torch, deterministic, device-agnostic (runs wherever ``noise`` lives) and has
no lightning/hydra dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dd.acceleration import FAST_PATHS, CompileOptions, CudaGraphCallable, compile_callable, full_precision
from dd.acceleration import require_cuda_graphs

__all__ = [
    "SOLVERS",
    "TIME_GRIDS",
    "FlowMapConfig",
    "FlowMapResult",
    "log_probs_from_probs",
    "make_time_grid",
    "posterior_mean",
    "integrate_flow",
    "snap_to_codebook",
    "map_noise_to_tokens",
]

SOLVERS = ("euler", "dpmpp_2m", "heun")
TIME_GRIDS = ("uniform", "quadratic", "power")
SUPPORTS = ("auto", "dense", "compact")
#: ``support="auto"`` solves a row chunk over the rows' supports when its largest support is at most this fraction of
#: the codebook (``scripts/bench_flow_support.py`` on this project's CPU, ``docs/flow_map_study.md``: at 0.25 V the
#: restricted solve takes 0.81-0.85 (8-d codebook, V = 16384) / 0.71 (32-d, V = 4096) of the dense time; it breaks
#: even at ~0.35 V / ~0.5 V)
AUTO_SUPPORT_FRACTION = 0.25
#: codebooks of at most this many dimensions solve a support-restricted block in the *gathered* form: every row's
#: support columns of ``[C^T; ||c||^2]`` and ``C^T`` are gathered once per position / scale, then each step is two
#: batched matrix-vector products and a softmax over the k support entries only (no full-width distance matmul, no
#: per-step gather). Wider tokens keep the *shared* form (one GEMM against the whole codebook, gathered at the
#: support), where the gathered copy (k (2 d + 1) floats a row) costs more memory traffic than it saves. Measured on
#: CPU (1 thread, ``scripts/bench_flow_support.py``, ``docs/flow_map_study.md``, "Support restriction"): V = 16384,
#: d = 8, k = V/4: gathered 0.66x (8 rows) / 0.44x (256 rows) of the dense time, shared 0.85x / 0.81x; in a
#: micro-benchmark at V = 4096, d = 32, k = 900, 256 rows: gathered ~1.8x, shared ~0.6x of dense.
GATHER_MAX_DIM = 16
#: ``support="auto"`` compacts a gathered-form chunk (d <= GATHER_MAX_DIM) whose largest support is at most this
#: fraction of V (measured at V = 16384, d = 8: 0.92x (8 rows) / 0.77x (256 rows) of the dense time at 0.40 V,
#: break-even at ~0.45-0.5 V with 8 rows: LlamaGen's top-k 8000 of 16384 stays dense)
AUTO_SUPPORT_FRACTION_GATHERED = 0.4
#: on CPU a solve runs row blocks of at most this many logits per step (2**19 floats = 2 MB, e.g. 128 rows for
#: V = 4096), so that they stay in cache: measured 1.3x (V = 4096, d = 32, 1024 rows) to 1.7x (V = 16384, d = 8,
#: 256 rows) faster than one block (dense; 1.4x / 1.7x support-restricted)
_CPU_BLOCK = 2**19
_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------
# configuration / result containers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowMapConfig:
    """Settings of the per-token ODE solve.

    Attributes:
        solver: ``"euler"`` (DDIM, 1st order), ``"dpmpp_2m"`` (DPM-Solver++(2M), 2nd order multistep,
            1 evaluation/step) or ``"heun"`` (2nd order, 2 evaluations/step).
        num_steps: number of ODE steps (intervals of the time grid), >= 1.
        time_grid: ``"uniform"`` (``t_i = 1 - i/n``), ``"quadratic"`` (``t_i = (1 - i/n)^2``, denser
            near the data end t = 0) or ``"power"`` (``t_i = (1 - i/n)^grid_power``).
        grid_power: exponent of the ``"power"`` grid (> 0; ignored by the other grids).
        chunk_size: rows (tokens) integrated at once; peak memory ≈ ``chunk_size * V`` floats
            (times ``vocab_chunk_size / V`` when column streaming is on). A support-restricted chunk is split
            further so that it never needs more memory than the dense one (rows x (V + 8 k) floats <= 2 x that);
            on CPU every chunk is also solved in blocks of at most 2**19 logits a step (``2**19 // V`` rows: cache).
        vocab_chunk_size: if set (and < V), the softmax over the codebook is computed in column blocks
            of this size with an online (streaming) softmax, so huge ``V`` fits in memory. (The support-restricted
            solve does not stream: it bounds its memory by solving fewer rows at once.)
        compute_dtype: ``"float32"`` (default) or ``"float64"``; inputs of any floating dtype
            (incl. float16/bfloat16) are upcast to it. The solve runs with autocast switched off, so a caller's
            bf16 autocast (Lightning ``bf16-mixed``, ``teacher_dtype``) never lowers it.
        fast_path: how the ODE solve of one row chunk (a position of every sample, or a whole VAR scale) runs:
            ``"eager"`` (default), ``"compile"`` (the whole unrolled solver loop as one ``torch.compile``
            program; the first compile of the 100-step loop takes minutes on a small CPU, one more when the
            row count changes) or ``"cuda_graph"`` (the eager loop captured once per row count and replayed:
            a position costs one graph launch instead of ~4 kernels x steps; CUDA only). An execution setting:
            pairs are the same indices as eager (endpoints equal within float rounding; see
            ``tests/test_fast_paths.py``), so it is not part of a pair directory's identity.
        support: which codes a row's solve runs over. ``"dense"``: all V codes. ``"compact"``: only the row's
            support (its finite log-probs), every row chunk padded to its largest support ``k``; codes with
            ``p = 0`` have posterior weight exactly 0, so this is the same ODE (endpoints equal within float
            rounding, same tokens in practice; the snap stays over the whole codebook). ``"auto"`` (default):
            compact for a chunk whose largest support is <= ``AUTO_SUPPORT_FRACTION`` (0.25) x V, dense otherwise;
            for codebooks of <= ``GATHER_MAX_DIM`` dimensions, whose restricted solve gathers every row's support
            codebook once and then never touches the other codes, up to ``AUTO_SUPPORT_FRACTION_GATHERED`` (0.4) x V.
            Measured on CPU (``docs/flow_map_study.md``): VAR-d16's top-k 900 / top-p 0.95 of 4096 is compacted
            (solves ~1.5x faster; pair-generation overhead +7.6% -> +4.9%); LlamaGen's top-k 8000 of 16384 (49 %)
            stays dense, where the restricted form is no faster (it breaks even at ~0.45-0.5 V). The
            ``"cuda_graph"`` fast path always solves dense (a captured graph needs fixed shapes, and ``k`` changes
            from position to position), so ``"compact"`` cannot be combined with it; ``"compile"`` takes both
            forms. An execution setting like ``fast_path``: not part of a pair directory's identity.

    The defaults (DPM-Solver++(2M), 100 steps, uniform grid) were chosen with ``scripts/flow_map_study.py``
    (see ``docs/flow_map_study.md``): the cheapest setting with token frequencies within sampling noise of ``p``
    and < 0.5 % of endpoints differing from a 1000-step solve on random codebooks up to V = 16384.
    """

    solver: str = "dpmpp_2m"
    num_steps: int = 100
    time_grid: str = "uniform"
    grid_power: float = 2.0
    chunk_size: int = 4096
    vocab_chunk_size: Optional[int] = None
    compute_dtype: str = "float32"
    fast_path: str = "eager"
    support: str = "auto"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"FlowMapConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"FlowMapConfig.num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.time_grid not in TIME_GRIDS:
            raise ValueError(f"FlowMapConfig.time_grid must be one of {TIME_GRIDS}, got {self.time_grid!r}")
        if not (isinstance(self.grid_power, (int, float)) and math.isfinite(self.grid_power) and self.grid_power > 0):
            raise ValueError(f"FlowMapConfig.grid_power must be a finite number > 0, got {self.grid_power!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"FlowMapConfig.chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.vocab_chunk_size is not None and (
            isinstance(self.vocab_chunk_size, bool)
            or not isinstance(self.vocab_chunk_size, int)
            or self.vocab_chunk_size < 1
        ):
            raise ValueError(
                f"FlowMapConfig.vocab_chunk_size must be None or an int >= 1, got {self.vocab_chunk_size!r}"
            )
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(
                f"FlowMapConfig.compute_dtype must be one of {tuple(_COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.fast_path not in FAST_PATHS:
            raise ValueError(f"FlowMapConfig.fast_path must be one of {FAST_PATHS}, got {self.fast_path!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"FlowMapConfig.support must be one of {SUPPORTS}, got {self.support!r}")
        if self.support == "compact" and self.fast_path == "cuda_graph":
            raise ValueError("FlowMapConfig.support='compact' cannot run on fast_path='cuda_graph' (captured graphs "
                             "need fixed shapes, the support size changes per position); use support='auto' "
                             "(dense under CUDA graphs) or fast_path='compile'")
        if self.fast_path == "cuda_graph":
            require_cuda_graphs("FlowMapConfig.fast_path='cuda_graph'")

    @property
    def num_evaluations(self) -> int:
        """Number of ``posterior_mean`` evaluations (NFE) per token."""
        if self.solver == "heun":
            return 2 * self.num_steps - 1
        return self.num_steps


@dataclass(frozen=True)
class FlowMapResult:
    """Output of :func:`map_noise_to_tokens` (leading dims ``...`` are those of ``noise``).

    Attributes:
        indices: ``(...,)`` int64, nearest codebook row of the ODE endpoint (squared L2, lowest index on ties).
        endpoint: ``(..., d)`` the ODE endpoint ``x_0`` (compute dtype, float32 by default).
        snap_residual: ``(...,)`` ``||endpoint - codebook[indices]||`` (compute dtype).
    """

    indices: Tensor
    endpoint: Tensor
    snap_residual: Tensor


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def log_probs_from_probs(probs: Tensor) -> Tensor:
    """``log(probs)`` with exact ``-inf`` for zero-probability (filtered) tokens.

    ``probs`` (..., V) must be non-negative; rows need not be normalised (only differences of log-probs
    within a row matter for the map). Use this to feed probabilities instead of log-probabilities to
    :func:`map_noise_to_tokens` / :func:`posterior_mean`. Computed in float32 (float64 stays float64).
    """
    if not torch.is_floating_point(probs):
        raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    if bool((probs < 0).any()) or bool(torch.isnan(probs).any()):
        raise ValueError("probs must be non-negative and not NaN")
    return torch.log(probs)  # log(0) = -inf exactly


def _validate_config(config: Optional[FlowMapConfig]) -> FlowMapConfig:
    if config is None:
        return FlowMapConfig()
    if not isinstance(config, FlowMapConfig):
        raise TypeError(f"config must be a FlowMapConfig, got {type(config).__name__}")
    return config


def make_time_grid(num_steps: int, time_grid: str = "uniform", grid_power: float = 2.0) -> list[float]:
    """Decreasing time grid ``[t_0 = 1, t_1, ..., t_n = 0]`` (``n = num_steps``) as Python floats.

    ``"uniform"``: ``t_i = 1 - i/n``; ``"quadratic"``: ``t_i = (1 - i/n)^2``; ``"power"``:
    ``t_i = (1 - i/n)^grid_power``. Endpoints are exactly 1.0 and 0.0.
    """
    # validation through the config (one place for the error messages)
    FlowMapConfig(num_steps=num_steps, time_grid=time_grid, grid_power=grid_power)
    n = num_steps
    if time_grid == "uniform":
        power = 1.0
    elif time_grid == "quadratic":
        power = 2.0
    else:
        power = float(grid_power)
    ts = [(1.0 - i / n) ** power for i in range(n + 1)]
    ts[0], ts[-1] = 1.0, 0.0
    return ts


def _check_inputs(x: Tensor, log_probs: Tensor, codebook: Tensor) -> None:
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be (V, d), got shape {tuple(codebook.shape)}")
    V, d = codebook.shape
    if x.shape[-1] != d:
        raise ValueError(f"last dim of x/noise ({x.shape[-1]}) must equal codebook dim d={d}")
    if log_probs.shape[-1] != V:
        raise ValueError(f"last dim of log_probs ({log_probs.shape[-1]}) must equal codebook size V={V}")
    if x.shape[:-1] != log_probs.shape[:-1]:
        raise ValueError(
            f"leading dims of x/noise {tuple(x.shape[:-1])} and log_probs {tuple(log_probs.shape[:-1])} differ"
        )
    for name, tensor in (("x/noise", x), ("log_probs", log_probs), ("codebook", codebook)):
        if not torch.is_floating_point(tensor):
            raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")


class _Codebook(NamedTuple):
    """Codebook prepared once per call: ``C`` (V, d), ``C^T`` (d, V), ``||c_k||^2`` (V,) and ``[C^T; ||c||^2]``
    (d + 1, V). A named tuple, so compiled code can rebuild it from its tensors."""

    c: Tensor
    ct: Tensor
    sq: Tensor
    ct_aug: Tensor

    @classmethod
    def prepare(cls, codebook: Tensor, dtype: torch.dtype, device: torch.device) -> "_Codebook":
        c = codebook.to(device=device, dtype=dtype).contiguous()
        ct = c.t().contiguous()
        sq = (c * c).sum(dim=1)
        return cls(c, ct, sq, torch.cat([ct, sq[None, :]], dim=0).contiguous())


def _posterior_mean_rows(
    x: Tensor, t: float, log_probs: Tensor, cb: _Codebook, vocab_chunk_size: Optional[int],
    support: Optional[Tensor] = None, gathered: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """``c_hat`` for one row chunk; x (n, d), log_probs (n, V), both in the compute dtype. With ``support`` (n, k)
    int64, every row's support columns (see :func:`_support_indices`), ``log_probs`` (n, k) are the log-probs at
    those columns (-inf at the padding). With ``gathered`` (:func:`_gather_support`: ``[C^T; ||c||^2]`` (n, d + 1, k)
    and ``C^T`` (n, d, k) at every row's support columns), ``log_probs`` are (n, k) likewise and ``support`` is
    unused."""
    a = 1.0 - t
    alpha = a / (t * t)  # coefficient of x.c_k
    beta = -0.5 * a * a / (t * t)  # coefficient of ||c_k||^2
    V = cb.c.shape[0]
    vb = V if vocab_chunk_size is None or vocab_chunk_size >= V else vocab_chunk_size

    if gathered is not None or support is not None or vb == V:
        # [alpha * x, beta] @ [c^T; ||c||^2] folds both distance terms into one (batched) matmul
        x_aug = torch.cat([x * alpha, x.new_full((x.shape[0], 1), beta)], dim=1)
        if gathered is not None:  # per-row codebooks: two batched matrix-vector products, softmax over k only
            ct_aug_rows, ct_rows = gathered
            logits = torch.baddbmm(log_probs[:, None, :], x_aug[:, None, :], ct_aug_rows)
            weights = torch.softmax(logits, dim=2)  # padding (-inf) gets weight exactly 0
            return torch.bmm(weights, ct_rows.transpose(1, 2)).squeeze(1)
        if support is not None:  # the same logits at the k support columns; softmax and weighted sum over k only
            logits = torch.mm(x_aug, cb.ct_aug).gather(1, support).add_(log_probs)
            weights = torch.softmax(logits, dim=1)  # padding (-inf) gets weight exactly 0
            return F.embedding_bag(support, cb.c, mode="sum", per_sample_weights=weights)
        logits = torch.addmm(log_probs, x_aug, cb.ct_aug)
        # single block: one affine matmul + fused softmax + matmul (3 passes over the (n, V) block); the weighted sum
        # reads the codebook as (d, V) (C^T transposed back): 2-2.5x faster than (V, d) for d = 8 on MKL, same for 32
        return torch.mm(torch.softmax(logits, dim=1), cb.ct.t())  # -inf entries get weight exactly 0

    # column streaming (online softmax): running max m, running sum s, running numerator acc
    n = x.shape[0]
    m = torch.full((n, 1), -math.inf, dtype=x.dtype, device=x.device)
    s = torch.zeros((n, 1), dtype=x.dtype, device=x.device)
    acc = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device)
    for j in range(0, V, vb):
        sl = slice(j, min(j + vb, V))
        logits = torch.addmm(log_probs[:, sl], x, cb.ct[:, sl], beta=1.0, alpha=alpha)
        if beta != 0.0:
            logits.add_(cb.sq[sl], alpha=beta)
        m_new = torch.maximum(m, logits.amax(dim=1, keepdim=True))
        # rows whose entries so far are all -inf: shift by 0 instead of -inf (avoids inf - inf = nan)
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        scale = torch.exp(m - shift)
        logits.sub_(shift).exp_()
        s = s * scale + logits.sum(dim=1, keepdim=True)
        acc = acc * scale + logits @ cb.c[sl]
        m = m_new
    return acc / s


def posterior_mean(
    x: Tensor,
    t: float,
    log_probs: Tensor,
    codebook: Tensor,
    *,
    chunk_size: int = 4096,
    vocab_chunk_size: Optional[int] = None,
    compute_dtype: str = "float32",
) -> Tensor:
    """Posterior mean ``c_hat(x, t) = E[c | x_t = x]`` of the Dirac-mixture target (method.md §2.2).

    ``c_hat(x, t) = sum_k w_k c_k`` with ``w = softmax_k(log p_k - ||x - (1-t) c_k||^2 / (2 t^2))``.

    Args:
        x: (N, d) points at time ``t``.
        t: Python float in (0, 1]; ``t = 1`` gives ``E_p[c]``.
        log_probs: (N, V) log-probabilities (or any per-row-shifted logits); ``-inf`` entries
            (filtered tokens) get weight exactly 0. Every row needs at least one finite entry.
        codebook: (V, d).
        chunk_size: rows processed at once (memory ≈ ``chunk_size * V`` floats).
        vocab_chunk_size: optional column block size for an online softmax over huge ``V``.
        compute_dtype: ``"float32"`` or ``"float64"``; the logits are formed in this dtype with
            max-subtraction, low-precision inputs are upcast.

    Returns:
        (N, d) tensor in the compute dtype, on ``x``'s device.
    """
    t = float(t)
    if not (0.0 < t <= 1.0):
        raise ValueError(f"t must be in (0, 1], got {t}")
    if x.dim() != 2 or log_probs.dim() != 2:
        raise ValueError(f"x must be (N, d) and log_probs (N, V); got {tuple(x.shape)}, {tuple(log_probs.shape)}")
    _check_inputs(x, log_probs, codebook)
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(_COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1):
        raise ValueError("chunk_size and vocab_chunk_size must be >= 1")
    dtype = _COMPUTE_DTYPES[compute_dtype]
    device = x.device
    with full_precision(device.type):
        cb = _Codebook.prepare(codebook, dtype, device)
        out = torch.empty((x.shape[0], x.shape[1]), dtype=dtype, device=device)
        for i in range(0, x.shape[0], chunk_size):
            xs = x[i : i + chunk_size].to(dtype)
            lp = log_probs[i : i + chunk_size].to(device=device, dtype=dtype)
            out[i : i + chunk_size] = _posterior_mean_rows(xs, t, lp, cb, vocab_chunk_size)
    return out


# --------------------------------------------------------------------------------------------------
# ODE solve
# --------------------------------------------------------------------------------------------------


def _lambda(t: float) -> float:
    """Half log-SNR ``log(alpha_t / sigma_t) = log((1-t)/t)``; -inf at t = 1, +inf at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log1p(-t) - math.log(t)


def _integrate_rows(x: Tensor, log_probs: Tensor, cb: _Codebook, solver: str, vocab_chunk_size: Optional[int],
                    ts: list[float], support: Optional[Tensor] = None,
                    gathered: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Run the solver for one row chunk (x: (n, d) noise at t = 1, already in the compute dtype); over the rows'
    supports when ``support`` (n, k) or ``gathered`` (see :func:`_posterior_mean_rows`) is given."""
    n_steps = len(ts) - 1
    vc = vocab_chunk_size

    def D(xx: Tensor, tt: float) -> Tensor:
        return _posterior_mean_rows(xx, tt, log_probs, cb, vc, support, gathered)

    if solver == "euler":
        for i in range(n_steps):
            t, s = ts[i], ts[i + 1]
            d0 = D(x, t)
            ratio = s / t
            x = torch.lerp(d0, x, ratio) if s > 0 else d0  # (s/t) x + (1 - s/t) d0
        return x

    if solver == "dpmpp_2m":
        d_prev: Optional[Tensor] = None
        h_prev = math.nan
        for i in range(n_steps):
            t, s = ts[i], ts[i + 1]
            d0 = D(x, t)
            h = _lambda(s) - _lambda(t)
            if s <= 0.0:  # lower order final: x_0 = c_hat(x_t, t)
                x = d0
                break
            if d_prev is not None and math.isfinite(h_prev) and math.isfinite(h):
                r = h_prev / h
                d_eff = d0 + (d0 - d_prev) * (0.5 / r)
            else:  # first step (lambda_1 = -inf) or the step after it: first order
                d_eff = d0
            x = torch.lerp(d_eff, x, s / t)
            d_prev, h_prev = d0, h
        return x

    if solver == "heun":
        for i in range(n_steps):
            t, s = ts[i], ts[i + 1]
            d0 = D(x, t)
            if s <= 0.0:  # Euler to t = 0 (no division by s = 0)
                x = d0
                break
            v0 = (x - d0) / t
            x_pred = x + (s - t) * v0
            d1 = D(x_pred, s)
            v1 = (x_pred - d1) / s
            x = x + (0.5 * (s - t)) * (v0 + v1)
        return x

    raise ValueError(f"unknown solver {solver!r}")  # unreachable (config validated)


def _validate_log_probs(log_probs: Tensor, chunk_size: int) -> list[int]:
    """Check ``log_probs`` (..., V) and measure its supports: returns the largest support (number of entries > -inf)
    of every ``chunk_size`` rows, as host ints."""
    rows = log_probs.reshape(-1, log_probs.shape[-1])
    if rows.numel() == 0:
        return []
    counts = (rows > -math.inf).sum(dim=1, dtype=torch.int32)  # NaN is not > -inf (and is refused below)
    n_chunks = -(-rows.shape[0] // chunk_size)
    padded = F.pad(counts, (0, n_chunks * chunk_size - rows.shape[0]))
    # one host synchronisation for the checks and the chunk maxima (this runs once per AR step of pair generation);
    # the maximum propagates NaN and +inf
    top, fewest, *chunk_max = torch.cat([rows.amax().reshape(1).double(), counts.amin().reshape(1).double(),
                                         padded.view(n_chunks, chunk_size).amax(dim=1).double()]).tolist()
    if math.isnan(top):
        raise ValueError("log_probs contains NaN")
    if top == math.inf:
        raise ValueError("log_probs contains +inf")
    if fewest == 0:
        raise ValueError("every row of log_probs needs at least one finite entry (all tokens filtered?)")
    return [int(k) for k in chunk_max]


def _support_indices(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every row's support, padded to ``k`` (>= every row's support size): returns the columns (n, k) int64, the
    row's support columns (log-prob > -inf) in increasing order then column 0 as padding, and the log-probs there
    (n, k), -inf at the padding (so the padding has weight exactly 0 whatever column it names). log_probs (n, V)."""
    n, V = log_probs.shape
    flat = (log_probs > -math.inf).view(-1).nonzero().squeeze(1)  # row-major: sorted by (row, column)
    row = torch.div(flat, V, rounding_mode="floor")
    starts = torch.searchsorted(flat, torch.arange(n, device=flat.device) * V)  # each row's first entry in flat
    target = row * k + torch.arange(flat.numel(), device=flat.device) - starts[row]  # (row, slot) in the (n, k) block
    indices = torch.zeros((n, k), dtype=torch.int64, device=log_probs.device)
    indices.view(-1)[target] = flat - row * V
    support_log_probs = torch.full((n, k), -math.inf, dtype=log_probs.dtype, device=log_probs.device)
    support_log_probs.view(-1)[target] = log_probs.reshape(-1)[flat]
    return indices, support_log_probs


def _solve_rows(x: Tensor, log_probs: Tensor, c: Tensor, ct: Tensor, sq: Tensor, ct_aug: Tensor, solver: str,
                ts: tuple[float, ...], vocab_chunk_size: Optional[int], support: Optional[Tensor] = None,
                ct_aug_rows: Optional[Tensor] = None, ct_rows: Optional[Tensor] = None) -> Tensor:
    """:func:`_integrate_rows` on plain tensors: the capture-safe unit that the compiled and CUDA-graph fast paths
    run (no host synchronisation; the time grid and solver are constants of the program)."""
    gathered = None if ct_aug_rows is None or ct_rows is None else (ct_aug_rows, ct_rows)
    return _integrate_rows(x, log_probs, _Codebook(c, ct, sq, ct_aug), solver, vocab_chunk_size, list(ts), support,
                           gathered)


_FAST_SOLVES: dict[tuple[str, str], Callable[..., Tensor]] = {}


def _fast_solve(fast_path: str, device_type: str) -> Callable[..., Tensor]:
    """The compiled / graphed :func:`_solve_rows`, one per (fast path, device type) per process: compiled programs
    and captured graphs are reused by every later call with the same shapes and settings."""
    key = (fast_path, device_type)
    if key not in _FAST_SOLVES:
        if fast_path == "cuda_graph":
            _FAST_SOLVES[key] = CudaGraphCallable(_solve_rows, clone_outputs=True, warmup=1)
        else:  # the row count varies (VAR scales, last chunk): let torch make it dynamic after one recompile
            _FAST_SOLVES[key] = compile_callable(_solve_rows, device_type, CompileOptions(dynamic=None))
    return _FAST_SOLVES[key]


def _solve_chunk(x: Tensor, log_probs: Tensor, cb: _Codebook, config: FlowMapConfig, ts: list[float],
                 support: Optional[Tensor] = None, gathered: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    if config.fast_path == "eager":
        return _integrate_rows(x, log_probs, cb, config.solver, config.vocab_chunk_size, ts, support, gathered)
    solve = _fast_solve(config.fast_path, x.device.type)
    args = (x, log_probs, cb.c, cb.ct, cb.sq, cb.ct_aug, config.solver, tuple(ts), config.vocab_chunk_size)
    if gathered is not None:
        return solve(*args, None, *gathered)
    return solve(*args) if support is None else solve(*args, support)


def _gathers(d: int) -> bool:
    """Whether support-restricted blocks of a d-dimensional codebook use the gathered form (``GATHER_MAX_DIM``)."""
    return d <= GATHER_MAX_DIM


def _gather_support(cb: _Codebook, support: Tensor) -> tuple[Tensor, Tensor]:
    """Every row's support columns of ``[C^T; ||c||^2]`` (n, d + 1, k) and ``C^T`` (n, d, k), contiguous."""
    return (cb.ct_aug.t()[support].transpose(1, 2).contiguous(), cb.c[support].transpose(1, 2).contiguous())


def _compacts(config: FlowMapConfig, k: int, V: int, d: int) -> bool:
    """Whether a row chunk whose largest support is ``k`` is solved over the supports (``FlowMapConfig.support``);
    ``d``: the codebook's dimension (the gathered form is worth it up to a larger support)."""
    if config.support == "dense" or config.fast_path == "cuda_graph":
        return False
    fraction = AUTO_SUPPORT_FRACTION_GATHERED if _gathers(d) else AUTO_SUPPORT_FRACTION
    return config.support == "compact" or k <= fraction * V


def _block_rows(config: FlowMapConfig, k: Optional[int], V: int, device_type: str, d: int) -> int:
    """Rows solved at once: ``chunk_size``; over supports of size ``k`` (``None``: dense) at most the memory of a
    dense chunk, ~2 x chunk_size x min(V, vocab_chunk_size) floats (logits + weights), for ~V + 8 k floats a row (the
    full logits, the gathered logits, weights and int64 columns, and the index construction's temporaries) plus, in
    the gathered form (``d <= GATHER_MAX_DIM``), the two gathered codebooks and their unpermuted copies, 2 k (2 d + 1)
    floats. On CPU also at most ``_CPU_BLOCK`` logits (the (rows, V) block, or (rows, vocab_chunk_size) when
    streaming dense)."""
    width = V if config.vocab_chunk_size is None else min(V, config.vocab_chunk_size)
    rows = config.chunk_size
    if k is not None:
        per_row = V + 8 * k + (2 * k * (2 * d + 1) if _gathers(d) else 0)
        rows = max(1, min(rows, 2 * config.chunk_size * width // per_row))
    if device_type == "cpu":
        rows = min(rows, max(1, _CPU_BLOCK // (width if k is None else V)))
    return rows


def integrate_flow(
    noise: Tensor, log_probs: Tensor, codebook: Tensor, config: Optional[FlowMapConfig] = None
) -> Tensor:
    """Integrate the per-token ODE from ``t = 1`` (``x = noise``) to ``t = 0``; returns the endpoint.

    Shapes as in :func:`map_noise_to_tokens`: noise (..., d), log_probs (..., V), codebook (V, d);
    returns (..., d) in the compute dtype. No snapping.
    """
    config = _validate_config(config)
    _check_inputs(noise, log_probs, codebook)
    chunk_support = _validate_log_probs(log_probs, config.chunk_size)
    with full_precision(noise.device.type):
        return _integrate_all(noise, log_probs, codebook, config, chunk_support)


def _integrate_all(noise: Tensor, log_probs: Tensor, codebook: Tensor, config: FlowMapConfig,
                   chunk_support: list[int]) -> Tensor:
    lead = noise.shape[:-1]
    d = noise.shape[-1]
    V = codebook.shape[0]
    dtype = _COMPUTE_DTYPES[config.compute_dtype]
    device = noise.device
    x_all = noise.reshape(-1, d)
    lp_all = log_probs.reshape(-1, V)
    cb = _Codebook.prepare(codebook, dtype, device)
    ts = make_time_grid(config.num_steps, config.time_grid, config.grid_power)
    out = torch.empty((x_all.shape[0], d), dtype=dtype, device=device)
    cs = config.chunk_size
    for chunk, i in enumerate(range(0, x_all.shape[0], cs)):
        x = x_all[i : i + cs].to(dtype=dtype, copy=True)
        lp = lp_all[i : i + cs].to(device=device, dtype=dtype)
        k = chunk_support[chunk]
        compact = _compacts(config, k, V, d)
        rows = _block_rows(config, k if compact else None, V, device.type, d)
        for j in range(0, x.shape[0], rows):
            block = slice(j, min(j + rows, x.shape[0]))
            if not compact:
                solved = _solve_chunk(x[block], lp[block], cb, config, ts)
            else:  # the solve over the block's supports (log-probs and codebook rows gathered per row)
                support, lp_support = _support_indices(lp[block], k)
                if _gathers(d):
                    solved = _solve_chunk(x[block], lp_support, cb, config, ts, gathered=_gather_support(cb, support))
                else:
                    solved = _solve_chunk(x[block], lp_support, cb, config, ts, support)
            out[i + block.start : i + block.stop] = solved
    return out.reshape(*lead, d)


def snap_to_codebook(x: Tensor, codebook: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Nearest codebook row of every vector: returns ``(indices int64 (...,), residual (...,))``.

    Squared-L2 argmin, computed in float64 as ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row);
    ties go to the lowest index (``torch.argmin`` returns the first minimum). ``residual`` is the
    exact ``||x - codebook[idx]||`` in ``x``'s dtype (float32 for low-precision inputs).
    """
    if codebook.dim() != 2 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x (..., d) and codebook (V, d) mismatch: {tuple(x.shape)} vs {tuple(codebook.shape)}")
    with full_precision(x.device.type):
        return _snap(x, codebook, chunk_size)


def _snap(x: Tensor, codebook: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-1]
    d = x.shape[-1]
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.reshape(-1, d)
    c64 = codebook.to(device=x.device, dtype=torch.float64)
    ct64 = c64.t().contiguous()
    sq = (c64 * c64).sum(dim=1)
    idx = torch.empty(xf.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, xf.shape[0], chunk_size):
        xs = xf[i : i + chunk_size].to(torch.float64)
        dist = torch.addmm(sq.unsqueeze(0), xs, ct64, beta=1.0, alpha=-2.0)
        idx[i : i + chunk_size] = dist.argmin(dim=1)
    nearest = codebook.to(device=x.device)[idx].to(out_dtype)
    residual = torch.linalg.vector_norm(xf.to(out_dtype) - nearest, dim=-1)
    return idx.reshape(lead), residual.reshape(lead)


def map_noise_to_tokens(
    noise: Tensor,
    log_probs: Optional[Tensor],
    codebook: Tensor,
    config: Optional[FlowMapConfig] = None,
    *,
    probs: Optional[Tensor] = None,
) -> FlowMapResult:
    """Deterministic flow-matching map from Gaussian noise to codebook tokens (method.md §2.2-2.4).

    Integrates ``dx/dt = (x - c_hat(x, t)) / t`` from ``x_1 = noise`` (t = 1) to t = 0 with the solver
    and time grid of ``config`` (``c_hat`` = posterior mean of ``sum_k p_k delta(c_k)`` under the path
    ``x_t = (1-t) c + t eps``, see :func:`posterior_mean`), then snaps the endpoint to the nearest codebook
    row. If ``noise ~ N(0, I_d)`` the returned indices are distributed (up to solver error) as ``p``.

    Args:
        noise: (..., d) Gaussian noise, any leading dims (e.g. (B, L)); any float dtype.
        log_probs: (..., V) with the same leading dims: per-token log-probabilities (any per-row additive
            constant is irrelevant, so raw logits work too); ``-inf`` marks filtered tokens, which are
            never produced. Pass ``None`` and use ``probs=`` instead to give probabilities.
        codebook: (V, d) codebook rows (l2-normalised or raw; nothing is assumed).
        config: :class:`FlowMapConfig` (default: ``FlowMapConfig()``).
        probs: keyword alternative to ``log_probs`` (non-negative, zero = filtered), converted with
            :func:`log_probs_from_probs`. Exactly one of ``log_probs`` / ``probs`` must be given.

    Returns:
        :class:`FlowMapResult` with ``indices`` (...,) int64, ``endpoint`` (..., d) and
        ``snap_residual`` (...,). Fully deterministic (no randomness inside).
    """
    if (log_probs is None) == (probs is None):
        raise ValueError("give exactly one of log_probs or probs")
    if log_probs is None:
        log_probs = log_probs_from_probs(probs)
    config = _validate_config(config)
    endpoint = integrate_flow(noise, log_probs, codebook, config)
    indices, residual = snap_to_codebook(endpoint, codebook, chunk_size=config.chunk_size)
    return FlowMapResult(indices=indices, endpoint=endpoint, snap_residual=residual)
