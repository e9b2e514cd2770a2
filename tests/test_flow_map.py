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
