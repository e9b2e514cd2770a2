"""Tests of the per-token flow-matching map (dd.flow.token_map), method.md §2 and §10.1."""

from __future__ import annotations

import math

import pytest
import torch

from dd.flow import (
    FlowMapConfig,
    FlowMapResult,
    integrate_flow,
    log_probs_from_probs,
    make_time_grid,
    map_noise_to_tokens,
    posterior_mean,
    snap_to_codebook,
)

N_STAT = 20000
MULTINOMIAL_TRIALS = 10


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: the maps are many small ops, and on a loaded 2-core machine OpenMP
    threads waiting for each other make them several times slower than a single thread.
    (Function scope, defined in this module: runs after conftest's autouse thread setting.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _codebook(kind: str, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "d8_l2":  # LlamaGen-like: 8-d, l2-normalised
        c = torch.randn(vocab, 8, generator=g)
        return c / c.norm(dim=1, keepdim=True)
    if kind == "d32_raw":  # VAR-like: 32-d raw rows
        return 0.5 * torch.randn(vocab, 32, generator=g)
    raise ValueError(kind)


def _probs(dist: str, seed: int) -> torch.Tensor:
    # sizes chosen so that the multinomial TV has a relative spread of only ~6-9 % (many effective cells)
    g = torch.Generator().manual_seed(seed)
    if dist == "flat":
        return torch.softmax(0.3 * torch.randn(128, generator=g), 0)
    if dist == "peaked":  # effective support 1/sum p^2 ≈ 33 of 256
        return torch.softmax(1.5 * torch.randn(256, generator=g), 0)
    if dist == "topk":  # top-k truncated: only 96 of 256 tokens allowed
        logits = 1.0 * torch.randn(256, generator=g)
        kth = torch.topk(logits, 96).values[-1]
        return torch.softmax(torch.where(logits >= kth, logits, torch.full_like(logits, -math.inf)), 0)
    raise ValueError(dist)


def _tv(indices: torch.Tensor, p: torch.Tensor) -> float:
    freq = torch.bincount(indices.reshape(-1), minlength=p.numel()).double() / indices.numel()
    return 0.5 * (freq - p.double()).abs().sum().item()


def _multinomial_tv(p: torch.Tensor, n: int) -> float:
    g = torch.Generator().manual_seed(1234)
    return sum(_tv(torch.multinomial(p, n, replacement=True, generator=g), p) for _ in range(MULTINOMIAL_TRIALS)) / (
        MULTINOMIAL_TRIALS
    )


def _brute_posterior_mean(x, t, log_probs, codebook):
    """Reference with the explicit (N, V, d) tensor, float64."""
    x, lp, c = x.double(), log_probs.double(), codebook.double()
    dist2 = ((x[:, None, :] - (1 - t) * c[None]) ** 2).sum(-1)
    w = torch.softmax(lp - dist2 / (2 * t * t), dim=1)
    return w @ c


def _random_case(n=300, vocab=97, d=8, seed=0, filtered=True):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(vocab, d, generator=g)
    x = torch.randn(n, d, generator=g)
    logits = 2.0 * torch.randn(n, vocab, generator=g)
    if filtered:
        logits[:, ::3] = -math.inf
    return x, torch.log_softmax(logits, dim=1), codebook


# --------------------------------------------------------------------------------------------------
# statistical correctness (method.md §10.1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["d8_l2", "d32_raw"])
@pytest.mark.parametrize("dist", ["flat", "peaked", "topk"])
def test_token_frequencies_match_p(kind, dist):
    p = _probs(dist, seed=11)
    vocab = p.numel()
    codebook = _codebook(kind, vocab, seed=22)
    d = codebook.shape[1]
    noise = torch.randn(N_STAT, d, generator=torch.Generator().manual_seed(33))
    res = map_noise_to_tokens(noise, torch.log(p).expand(N_STAT, -1), codebook, FlowMapConfig())

    tv_map = _tv(res.indices, p)
    tv_mult = _multinomial_tv(p, N_STAT)
    assert tv_map <= 1.2 * tv_mult, f"TV {tv_map:.4f} vs multinomial {tv_mult:.4f}"
    # filtered tokens (p = 0) are never produced
    assert bool((p[res.indices] > 0).all())
    # converged map: endpoints land on codebook rows
    assert res.snap_residual.max().item() < 1e-4


# --------------------------------------------------------------------------------------------------
# contract: determinism, shapes, chunking, solvers
# --------------------------------------------------------------------------------------------------


def test_deterministic():
    x, lp, c = _random_case(seed=1)
    a = map_noise_to_tokens(x, lp, c)
    b = map_noise_to_tokens(x.clone(), lp.clone(), c.clone())
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.endpoint, b.endpoint)
    assert a.indices.dtype == torch.int64


def test_leading_dims():
    x, lp, c = _random_case(n=3 * 5, seed=2)
    flat = map_noise_to_tokens(x, lp, c)
    res = map_noise_to_tokens(x.reshape(3, 5, -1), lp.reshape(3, 5, -1), c)
    assert isinstance(res, FlowMapResult)
    assert res.indices.shape == (3, 5)
    assert res.endpoint.shape == (3, 5, c.shape[1])
    assert res.snap_residual.shape == (3, 5)
    assert torch.equal(res.indices.reshape(-1), flat.indices)
    torch.testing.assert_close(res.endpoint.reshape(-1, c.shape[1]), flat.endpoint)
    # a single token without leading dims
    one = map_noise_to_tokens(x[0], lp[0], c)
    assert one.indices.shape == () and one.endpoint.shape == (c.shape[1],)
    assert one.indices.item() == flat.indices[0].item()


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun"])
def test_chunked_equals_unchunked(solver):
    x, lp, c = _random_case(n=257, vocab=300, seed=3)
    base = FlowMapConfig(solver=solver, num_steps=30, chunk_size=100000)
    ref = map_noise_to_tokens(x, lp, c, base)
    for cs, vcs in [(7, None), (64, 50), (100000, 37)]:
        cfg = FlowMapConfig(solver=solver, num_steps=30, chunk_size=cs, vocab_chunk_size=vcs)
        out = map_noise_to_tokens(x, lp, c, cfg)
        assert torch.equal(out.indices, ref.indices), (cs, vcs)
        torch.testing.assert_close(out.endpoint, ref.endpoint, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["d8_l2", "d32_raw"])
def test_euler_many_steps_agrees_with_default_second_order(kind):
    p = _probs("peaked", seed=5)
    c = _codebook(kind, p.numel(), seed=6)
    n = 2000
    noise = torch.randn(n, c.shape[1], generator=torch.Generator().manual_seed(7))
    lp = torch.log(p).expand(n, -1)
    default = map_noise_to_tokens(noise, lp, c)
    euler = map_noise_to_tokens(noise, lp, c, FlowMapConfig(solver="euler", num_steps=400, time_grid="uniform"))
    heun = map_noise_to_tokens(noise, lp, c, FlowMapConfig(solver="heun", num_steps=50, time_grid="quadratic"))
    assert (default.indices == euler.indices).double().mean().item() >= 0.99
    assert (default.indices == heun.indices).double().mean().item() >= 0.99


@pytest.mark.parametrize("kind", ["d8_l2", "d32_raw"])
def test_one_hot_maps_everything_to_that_token(kind):
    c = _codebook(kind, 64, seed=8)
    d = c.shape[1]
    n = 500
    noise = 5.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(9))  # also far-out noise
    p = torch.zeros(n, 64)
    p[:, 17] = 1.0
    for solver in ["euler", "dpmpp_2m", "heun"]:
        res = map_noise_to_tokens(noise, None, c, FlowMapConfig(solver=solver, num_steps=10), probs=p)
        assert bool((res.indices == 17).all())
        assert res.snap_residual.max().item() < 1e-6


def test_filtered_tokens_have_zero_weight():
    x, lp, c = _random_case(n=64, vocab=50, seed=10)
    lp[:, 1:] = -math.inf  # only token 0 allowed
    lp[:, 0] = -3.0
    for t in [1.0, 0.5, 1e-3]:
        out = posterior_mean(x, t, lp, c)
        torch.testing.assert_close(out, c[0].expand(64, -1))


# --------------------------------------------------------------------------------------------------
# posterior mean
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 0.9, 0.5, 0.1, 0.01])
def test_posterior_mean_matches_brute_force(t):
    x, lp, c = _random_case(n=200, vocab=97, seed=12)
    x = (1 - t) * c[torch.arange(200) % 97] + t * x  # points on realistic paths
    ref = _brute_posterior_mean(x, t, lp, c)
    out = posterior_mean(x, t, lp, c, compute_dtype="float64")
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    out32 = posterior_mean(x, t, lp, c)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=2e-4, rtol=2e-4)
    stream = posterior_mean(x, t, lp, c, chunk_size=33, vocab_chunk_size=10, compute_dtype="float64")
    torch.testing.assert_close(stream, ref, atol=1e-9, rtol=1e-9)


def test_posterior_mean_at_t1_is_expected_code():
    x, lp, c = _random_case(n=20, vocab=40, seed=13)
    torch.testing.assert_close(posterior_mean(x, 1.0, lp, c), (lp.exp() @ c).float(), atol=1e-5, rtol=1e-5)


def test_posterior_mean_rejects_bad_t():
    x, lp, c = _random_case(n=4, vocab=5, seed=14)
    for t in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError):
            posterior_mean(x, t, lp, c)


# --------------------------------------------------------------------------------------------------
# inputs, dtypes, helpers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x, lp, c = _random_case(n=200, vocab=64, seed=15)
    x, lp, c = x.to(dtype), lp.to(dtype), c.to(dtype)
    res = map_noise_to_tokens(x, lp, c)
    ref = map_noise_to_tokens(x.float(), lp.float(), c.float())
    assert res.endpoint.dtype == torch.float32
    assert torch.equal(res.indices, ref.indices)
    assert torch.isfinite(res.endpoint).all()
    res64 = map_noise_to_tokens(x, lp, c, FlowMapConfig(compute_dtype="float64"))
    assert res64.endpoint.dtype == torch.float64
    assert (res64.indices == ref.indices).double().mean().item() >= 0.99


def test_probs_keyword_and_unnormalised_logits():
    x, lp, c = _random_case(n=100, vocab=64, seed=16)
    a = map_noise_to_tokens(x, lp, c)
    b = map_noise_to_tokens(x, None, c, probs=lp.exp())
    shifted = map_noise_to_tokens(x, lp + 3.0, c)  # per-row constant is irrelevant
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, shifted.indices)
    lpp = log_probs_from_probs(torch.tensor([0.5, 0.0, 0.5]))
    assert lpp[1].item() == -math.inf
    with pytest.raises(ValueError):
        map_noise_to_tokens(x, lp, c, probs=lp.exp())
    with pytest.raises(ValueError):
        map_noise_to_tokens(x, None, c)
    with pytest.raises(ValueError):
        log_probs_from_probs(torch.tensor([0.5, -0.1]))


def test_input_validation():
    x, lp, c = _random_case(n=10, vocab=20, seed=17)
    with pytest.raises(ValueError):
        map_noise_to_tokens(x[:, :5], lp, c)  # wrong d
    with pytest.raises(ValueError):
        map_noise_to_tokens(x, lp[:, :10], c)  # wrong V
    with pytest.raises(ValueError):
        map_noise_to_tokens(x[:9], lp, c)  # leading dims differ
    bad = lp.clone()
    bad[3] = -math.inf  # all tokens filtered
    with pytest.raises(ValueError):
        map_noise_to_tokens(x, bad, c)
    bad = lp.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError):
        map_noise_to_tokens(x, bad, c)


def test_snap_ties_go_to_lowest_index():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    idx, res = snap_to_codebook(x, c)
    assert idx.tolist() == [0, 0, 0, 3]
    torch.testing.assert_close(res, torch.tensor([math.sqrt(0.02), 0.0, 1.0, 1.0]))


def test_time_grids():
    for grid in ["uniform", "quadratic", "power"]:
        ts = make_time_grid(7, grid, 1.5)
        assert len(ts) == 8 and ts[0] == 1.0 and ts[-1] == 0.0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert make_time_grid(4, "uniform") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert make_time_grid(2, "quadratic") == [1.0, 0.25, 0.0]
    # a single step is exact first order: x_0 = c_hat(noise, 1) = E_p[c]
    x, lp, c = _random_case(n=5, vocab=6, seed=18)
    end = integrate_flow(x, lp, c, FlowMapConfig(num_steps=1))
    torch.testing.assert_close(end, (lp.exp() @ c).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(solver="rk45"),
        dict(num_steps=0),
        dict(num_steps=-3),
        dict(num_steps=2.5),
        dict(time_grid="cosine"),
        dict(grid_power=0.0),
        dict(grid_power=float("nan")),
        dict(chunk_size=0),
        dict(vocab_chunk_size=0),
        dict(compute_dtype="float16"),
        dict(support="sparse"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        FlowMapConfig(**kwargs)


def test_runs_single_threaded():
    assert torch.get_num_threads() == 1


def test_config_is_frozen_and_nfe():
    cfg = FlowMapConfig()
    with pytest.raises(Exception):
        cfg.num_steps = 3  # type: ignore[misc]
    assert FlowMapConfig(solver="heun", num_steps=10).num_evaluations == 19
    assert FlowMapConfig(solver="euler", num_steps=10).num_evaluations == 10


# --------------------------------------------------------------------------------------------------
# support restriction (FlowMapConfig.support): the solve over each row's support is the dense solve
# --------------------------------------------------------------------------------------------------


def _support_case(kind: str, style: str, n: int = 48, seed: int = 0):
    """Noise, log-probs with per-row supports of varying size, codebook. ``top_k``: a top-k of its own per row, 1 to
    V/4 (the auto rule compacts these); ``top_p``: nucleus 0.9 of rows with temperatures 0.3-3 (support sizes from a
    handful to ~3/4 V) and one row of support 1; ``mixed``: top-k sizes 1 to V, incl. full-support rows next to
    support-1 rows."""
    from dd.sampling.logits import filter_top_k_top_p

    vocab = 512 if kind == "d8_l2" else 256
    codebook = _codebook(kind, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    logits = 2.0 * torch.randn(n, vocab, generator=g)
    if style == "top_p":
        logits = logits / (0.3 + 2.7 * torch.rand(n, 1, generator=g))
        logits[0, 7] += 50.0  # one token holds > 0.9 of the mass: support 1
        logits = filter_top_k_top_p(logits, top_k=0, top_p=0.9)
    else:
        high = vocab // 4 if style == "top_k" else vocab
        sizes = torch.randint(1, high + 1, (n,), generator=g)
        sizes[:3] = torch.tensor([1, high, 2])
        if style == "mixed":
            sizes[3::7] = vocab  # full support, no -inf at all
        kth = logits.sort(dim=1, descending=True).values.gather(1, (sizes - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -math.inf)
    noise = torch.randn(n, codebook.shape[1], generator=g)
    return noise, torch.log_softmax(logits, dim=1), codebook


def _assert_same_map(a: FlowMapResult, b: FlowMapResult, atol: float = 1e-5) -> None:
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.endpoint, b.endpoint, atol=atol, rtol=atol)
    torch.testing.assert_close(a.snap_residual, b.snap_residual, atol=atol, rtol=atol)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("kind", ["d8_l2", "d32_raw"])
@pytest.mark.parametrize("style", ["top_k", "top_p", "mixed"])
def test_support_restricted_solve_equals_the_dense_solve(solver, kind, style):
    noise, lp, c = _support_case(kind, style)
    sizes = torch.isfinite(lp).sum(dim=1)
    assert sizes.min().item() == 1 and (style != "mixed" or sizes.max().item() == c.shape[0])
    for steps in (8, 40):  # an unconverged endpoint (between codes) and a converged one
        dense = map_noise_to_tokens(noise, lp, c, FlowMapConfig(solver=solver, num_steps=steps, support="dense"))
        for chunk_size in (4096, 5):  # one chunk, or many chunks of different largest supports
            for support in ("compact", "auto"):
                cfg = FlowMapConfig(solver=solver, num_steps=steps, chunk_size=chunk_size, support=support)
                _assert_same_map(map_noise_to_tokens(noise, lp, c, cfg), dense)
    # the converged map only produces tokens of the row's support
    assert bool(torch.isfinite(lp.gather(1, dense.indices[:, None])).all())


@pytest.mark.parametrize("kind", ["d8_l2", "d32_raw"])
def test_both_forms_of_the_restricted_solve_equal_the_dense_solve(kind, monkeypatch):
    """The gathered form (per-row codebook copies) and the shared form (one GEMM against the whole codebook) are
    the same ODE whatever the codebook's dimension: force each form on both kinds (``GATHER_MAX_DIM``)."""
    from dd.flow import token_map

    noise, lp, c = _support_case(kind, "mixed", seed=5)
    for solver in ("euler", "dpmpp_2m"):
        dense = map_noise_to_tokens(noise, lp, c, FlowMapConfig(solver=solver, num_steps=20, support="dense"))
        for limit in (0, 64):  # 0: every codebook takes the shared form; 64: every one the gathered form
            monkeypatch.setattr(token_map, "GATHER_MAX_DIM", limit)
            for chunk_size in (4096, 7):
                cfg = FlowMapConfig(solver=solver, num_steps=20, chunk_size=chunk_size, support="compact")
                _assert_same_map(map_noise_to_tokens(noise, lp, c, cfg), dense)
            for extra in (dict(compute_dtype="float64"), dict(vocab_chunk_size=37)):
                atol = 1e-9 if extra.get("compute_dtype") == "float64" else 1e-5
                dense_extra = map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=12, support="dense", **extra))
                compact = map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=12, support="compact", **extra))
                _assert_same_map(compact, dense_extra, atol)


def test_support_restricted_solve_with_streaming_float64_and_leading_dims():
    noise, lp, c = _support_case("d32_raw", "mixed", n=60, seed=3)
    for extra in (dict(vocab_chunk_size=37), dict(vocab_chunk_size=37, chunk_size=7), dict(compute_dtype="float64")):
        atol = 1e-9 if extra.get("compute_dtype") == "float64" else 1e-5
        dense = map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=12, support="dense", **extra))
        compact = map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=12, support="compact", **extra))
        _assert_same_map(compact, dense, atol)
    shaped = map_noise_to_tokens(noise.reshape(4, 15, -1), lp.reshape(4, 15, -1), c,
                                 FlowMapConfig(num_steps=12, support="compact"))
    flat = map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=12, support="dense"))
    assert shaped.indices.shape == (4, 15)
    assert torch.equal(shaped.indices.reshape(-1), flat.indices)
    one = map_noise_to_tokens(noise[1], lp[1], c, FlowMapConfig(num_steps=12, support="compact"))
    assert one.indices.shape == () and one.indices.item() == flat.indices[1].item()


def test_support_indices_list_each_rows_support_then_zero_weight_padding():
    from dd.flow.token_map import _support_indices

    lp = torch.full((3, 6), -math.inf)
    lp[0, [1, 4]] = torch.tensor([-0.5, -1.0])
    lp[1, 3] = 0.0
    lp[2] = torch.log_softmax(torch.arange(6.0), 0)  # full support
    columns, values = _support_indices(lp, 6)
    assert columns[0, :2].tolist() == [1, 4] and columns[1, :1].tolist() == [3]
    assert columns[2].tolist() == list(range(6))
    assert torch.equal(values, lp.gather(1, columns).masked_fill(torch.arange(6) >= torch.tensor([[2], [1], [6]]),
                                                                   -math.inf))
    assert values[0, 2:].eq(-math.inf).all() and values[1, 1:].eq(-math.inf).all()


def test_auto_support_compacts_exactly_the_chunks_with_small_supports(monkeypatch):
    """``auto`` restricts a chunk when its largest support is <= AUTO_SUPPORT_FRACTION x V, ``dense`` never,
    ``compact`` always (also when a row has full support); memory of a restricted block stays bounded."""
    from dd.flow import token_map

    calls: list[tuple[int, int]] = []
    original = token_map._support_indices

    def spy(log_probs, k):
        calls.append((log_probs.shape[0], k))
        return original(log_probs, k)

    monkeypatch.setattr(token_map, "_support_indices", spy)
    noise, lp, c = _support_case("d8_l2", "top_k", n=20)  # supports 1..128 of 512: every chunk <= V/4
    lp[10:15] = torch.log_softmax(torch.randn(5, 512), dim=1)  # chunk 2 (rows 10-14) has full support
    k_max = [int(torch.isfinite(lp[i : i + 5]).sum(1).max()) for i in range(0, 20, 5)]
    assert k_max[2] == 512 and max(k_max[0], k_max[1], k_max[3]) <= token_map.AUTO_SUPPORT_FRACTION * 512

    def blocks(chunks: list[int]) -> list[tuple[int, int]]:  # (rows, k) of every restricted block of 5-row chunks
        rows = [token_map._block_rows(FlowMapConfig(chunk_size=5), k_max[i], 512, "cpu", 8) for i in chunks]
        return [(min(r, 5 - j), k_max[i]) for i, r in zip(chunks, rows) for j in range(0, 5, r)]

    assert blocks([2]) == [(1, 512)] * 5  # full support: split by the memory bound (V + 8 V + 34 V > 2 V a row)
    for support, expected in (("dense", []), ("auto", blocks([0, 1, 3])), ("compact", blocks([0, 1, 2, 3]))):
        calls.clear()
        map_noise_to_tokens(noise, lp, c, FlowMapConfig(num_steps=3, chunk_size=5, support=support))
        assert calls == expected, support
    # rows x (V + 8 k) <= 2 x chunk_size x V: a full-support compact chunk is split, a small-support one is not;
    # on CPU every solve (dense too) runs blocks of <= 2**19 logits (cache)
    rows = token_map._block_rows
    cfg = FlowMapConfig(chunk_size=4096)
    assert rows(cfg, 4096, 4096, "cuda", 32) == 2 * 4096 // 9 and rows(cfg, 400, 4096, "cuda", 32) == 4096
    assert rows(cfg, None, 4096, "cuda", 32) == 4096
    assert rows(cfg, None, 4096, "cpu", 32) == rows(cfg, 400, 4096, "cpu", 32) == 128
    streaming = FlowMapConfig(chunk_size=4096, vocab_chunk_size=64)
    assert rows(streaming, 900, 4096, "cuda", 32) == 2 * 4096 * 64 // (4096 + 8 * 900)
    assert rows(streaming, None, 2**20, "cpu", 32) == 4096  # streaming dense: (rows, 64) logits blocks
    assert rows(FlowMapConfig(chunk_size=4096, vocab_chunk_size=1024), None, 2**20, "cpu", 32) == 2**19 // 1024
    assert rows(FlowMapConfig(chunk_size=1), 10**6, 10**6, "cuda", 32) == rows(cfg, None, 2**20, "cpu", 32) == 1
    # the gathered form (d <= GATHER_MAX_DIM) also holds two per-row copies of k (2 d + 1) floats
    assert rows(cfg, 8000, 16384, "cuda", 8) == 2 * 4096 * 16384 // (16384 + 8 * 8000 + 2 * 8000 * 17)
    assert rows(cfg, 8000, 16384, "cpu", 8) == 2**19 // 16384


def test_cuda_graph_solves_dense_and_refuses_a_forced_compact(monkeypatch):
    from dd.flow import token_map

    with pytest.raises(ValueError, match="support='compact' cannot run on fast_path='cuda_graph'"):
        FlowMapConfig(support="compact", fast_path="cuda_graph")
    monkeypatch.setattr(token_map, "require_cuda_graphs", lambda *args, **kwargs: None)  # CPU-only machines
    graphed = FlowMapConfig(fast_path="cuda_graph")
    compacts = token_map._compacts
    assert graphed.support == "auto" and not compacts(graphed, 1, 4096, 32) and not compacts(graphed, 1, 4096, 8)
    assert compacts(FlowMapConfig(), 1024, 4096, 32) and not compacts(FlowMapConfig(), 1025, 4096, 32)
    # gathered form (8-d codebooks): up to 0.4 V; LlamaGen's top-k 8000 of 16384 (0.49 V) stays dense
    assert compacts(FlowMapConfig(), 6553, 16384, 8) and not compacts(FlowMapConfig(), 6554, 16384, 8)
    assert not compacts(FlowMapConfig(), 8000, 16384, 8) and compacts(FlowMapConfig(), 1638, 4096, 8)
    assert compacts(FlowMapConfig(support="compact"), 4096, 4096, 32) and compacts(FlowMapConfig(support="compact"), 4096, 4096, 8)
    assert not compacts(FlowMapConfig(support="dense"), 1, 4096, 32) and not compacts(FlowMapConfig(support="dense"), 1, 4096, 8)


def test_support_benchmark_script_times_both_forms(monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_flow_support.py"
    spec = importlib.util.spec_from_file_location("bench_flow_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["bench_flow_support.py", "--shapes", "256x8:6,128x32:5", "--fractions",
                                      "0.05,0.25", "--steps", "6", "--repeats", "1"])
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 256 x 8") or
            line.startswith("| 128 x 32")]
    assert len(rows) == 4 and all(row.endswith("| yes |") for row in rows)
