"""DD2's SiD generator loss (``method.loss_form=sid``) and the differentiable analytic teacher denoiser it needs.

Checked against independent computations: the chunked, checkpointed denoiser's vector-Jacobian product against a
one-shot formula written here, the loss's gradient against central finite differences in float64, its vanishing
when the fake denoiser is the teacher's, the guidance network's gradients left untouched, and the trainer end to end
on both test presets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dd.distill.dd2 import (ARDenoiser, analytic_denoiser, frozen_fake_denoiser, sid_generator_loss,
                            teacher_denoised_at, teacher_denoiser_fn)

from test_dd2 import _dd2_overrides, _mixture, preset  # noqa: F401  (preset: the both-families fixture)
from test_pairs import build_spec, compose_cfg
from test_train import _ema_and_raw


def _tokens(b: int, length: int, d: int, v: int, seed: int, dtype: torch.dtype = torch.float32):
    """A codebook, per-position log-probs, generated tokens q (requires grad), noise levels and noise."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, d, generator=g, dtype=dtype)
    log_probs = torch.log_softmax(2.0 * torch.randn(b, length, v, generator=g, dtype=dtype), dim=-1)
    q = torch.randn(b, length, d, generator=g, dtype=dtype).requires_grad_(True)
    s = 0.05 + 0.9 * torch.rand(b, length, generator=g, dtype=dtype)
    eps = torch.randn(b, length, d, generator=g, dtype=dtype)
    return codebook, log_probs, q, s, eps


class AnalyticFake(nn.Module):
    """A stand-in fake denoiser: the analytic mixture denoiser of ``log_probs`` (the teacher's, or another)."""

    def __init__(self, log_probs: torch.Tensor, codebook: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.log_probs, self.codebook, self.s = log_probs, codebook, s

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return teacher_denoised_at(x, self.s, self.log_probs, self.codebook, differentiable=True)


def _reference_denoiser(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor,
                        codebook: torch.Tensor) -> torch.Tensor:
    """E[q | x] written from the posterior directly: weights ~ p_k N(x; (1 - s) c_k, s^2 I), all rows at once."""
    sq_dist = (x[:, None, :] - (1.0 - s)[:, None, None] * codebook[None]).pow(2).sum(-1)
    weights = torch.softmax(log_probs - sq_dist / (2 * s * s)[:, None], dim=1)
    return weights @ codebook


# -- the differentiable analytic denoiser ---------------------------------------------------------------------------
def test_chunked_denoiser_differentiates_like_the_one_shot_formula() -> None:
    x, s, log_probs, codebook = _mixture(10, 16, 4, seed=3, top_k=6)
    x = x.requires_grad_(True)
    probe = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = analytic_denoiser(x, s, log_probs, codebook, chunk_size=3)  # 4 checkpointed chunks
    assert out.dtype == torch.float64 and out.requires_grad
    (grad,) = torch.autograd.grad((out * probe).sum(), x)
    ref = _reference_denoiser(x, s, log_probs, codebook)
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)
    # no graph without a differentiated input or under no_grad (the GTS / DMD uses)
    assert not analytic_denoiser(x.detach(), s, log_probs, codebook).requires_grad
    with torch.no_grad():
        assert not analytic_denoiser(x, s, log_probs, codebook).requires_grad


def test_denoiser_stays_float32_under_autocast() -> None:
    x, s, log_probs, codebook = (t.float() for t in _mixture(12, 16, 4, seed=4))
    plain = analytic_denoiser(x, s, log_probs, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = analytic_denoiser(x, s, log_probs, codebook)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


# -- the loss ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_sid_gradient_vanishes_when_the_fake_is_the_teacher_denoiser(normalize: bool) -> None:
    for seed in range(5):
        codebook, log_probs, q, s, eps = _tokens(3, 6, 4, 9, seed)
        teacher = teacher_denoiser_fn(s, log_probs, codebook)  # what the trainer passes
        terms = sid_generator_loss(q, s, eps, teacher, AnalyticFake(log_probs, codebook, s), alpha=1.2,
                                   normalize=normalize)
        (grad,) = torch.autograd.grad(terms.loss, q)
        assert float(terms.loss) == 0.0 and float(terms.grad_norm) == 0.0
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)
        # a different fake (another mixture's denoiser) gives a real gradient
        other = torch.log_softmax(torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(99 + seed)),
                                  dim=-1)
        terms = sid_generator_loss(q, s, eps, teacher, AnalyticFake(other, codebook, s), alpha=1.2,
                                   normalize=normalize)
        (grad,) = torch.autograd.grad(terms.loss, q)
        assert float(grad.abs().max()) > 1e-2 and float(terms.grad_norm) > 1e-3


def test_sid_gradient_matches_finite_differences() -> None:
    codebook, log_probs, q, s, eps = _tokens(2, 3, 2, 5, seed=7, dtype=torch.float64)
    other = torch.log_softmax(torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(8),
                                          dtype=torch.float64), dim=-1)
    teacher, fake = teacher_denoiser_fn(s, log_probs, codebook), AnalyticFake(other, codebook, s)

    def loss(tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return sid_generator_loss(tokens, s, eps, teacher, fake, alpha=1.2, normalize=normalize).loss

    (grad,) = torch.autograd.grad(loss(q), q)
    h = 1e-6
    fd = torch.zeros_like(q)
    base = q.detach()
    for index in range(base.numel()):
        step = torch.zeros(base.numel(), dtype=base.dtype)
        step[index] = h
        step = step.view_as(base)
        with torch.no_grad():
            fd.view(-1)[index] = (loss(base + step) - loss(base - step)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)
    # normalize: the per-sample weight is a detached constant, so the gradient is the weighted one
    (weighted,) = torch.autograd.grad(loss(q, normalize=True), q)
    with torch.no_grad():
        x = (1 - s[..., None]) * base + s[..., None] * eps
        weight = 1.0 / ((base - teacher(x)).abs().mean(dim=(1, 2), keepdim=True) + 1e-6)
    torch.testing.assert_close(weighted, weight * grad, rtol=1e-10, atol=1e-12)


class TinyTrunk(nn.Module):
    """A stand-in AR-diffusion trunk: position i's features from the label and the id before it."""

    feature_dim = 8

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.ids, self.labels = nn.Embedding(vocab + 1, 8), nn.Embedding(classes, 8)

    def forward(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([torch.full_like(ids[:, :1], self.ids.num_embeddings - 1), ids[:, :-1]], dim=1)
        return self.ids(previous) + self.labels(labels)[:, None]


def test_frozen_fake_denoiser_is_the_guidance_network_and_takes_no_gradient() -> None:
    torch.manual_seed(0)
    codebook, log_probs, q, s, eps = _tokens(3, 5, 4, 9, seed=11)
    fake = ARDenoiser(TinyTrunk(9, 4), token_dim=4, width=16, depth=2)
    labels, ids = torch.tensor([0, 3, 1]), torch.randint(9, (3, 5))
    frozen = frozen_fake_denoiser(fake, labels, ids, s)
    x = (1 - s[..., None]) * q.detach() + s[..., None] * eps
    torch.testing.assert_close(frozen(x), fake(labels, ids, x, s))  # the same function of x
    terms = sid_generator_loss(q, s, eps, teacher_denoiser_fn(s, log_probs, codebook), frozen)
    terms.loss.backward()
    assert q.grad is not None and float(q.grad.abs().max()) > 0
    assert all(p.grad is None for p in fake.parameters())


# -- the trainer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_form", ["sid", "dmd"])
def test_dd2_trains_with_either_loss_form(preset: str, loss_form: str, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """method.loss_form=sid (the default) and dmd end to end: finite losses, the generator moves, and its update
    leaves every gradient of the guidance network as it was (checked around each generator update)."""
    from dd.tasks.dd2 import DD2Task
    from dd.train import run as run_train

    checked = []
    original = DD2Task._update

    def update(self, optimizer, loss, parameters):
        if optimizer is not self.optimizers()[0]:
            return original(self, optimizer, loss, parameters)
        before = [None if p.grad is None else p.grad.clone() for p in self.fake.parameters()]
        original(self, optimizer, loss, parameters)
        after = [p.grad for p in self.fake.parameters()]
        checked.append(all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                           for a, b in zip(after, before)))

    monkeypatch.setattr(DD2Task, "_update", update)
    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path, preset, max_steps=8,
                                                             **{"method.loss_form": loss_form})))
    assert summary["global_step"] == 8 and len(checked) == 4 and all(checked)
    metrics = summary["metrics"]
    assert {"train/loss", "train/dd2_signal", "train/dd2_fake"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    ema, raw = _ema_and_raw(torch.load(summary["export"], weights_only=True), preset)
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    family = spec.build_family()
    initial = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher).state_dict()
    for state in (ema, raw):
        assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith(("layers.", "blocks.")))


def test_bad_loss_form_is_refused_before_training(tmp_path: Path) -> None:
    from dd.runs import ConfigError
    from dd.train import run as run_train

    with pytest.raises(ConfigError, match=r"method\.loss_form='dsm'.*dmd, sid"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.loss_form": "dsm"})))
    with pytest.raises(ConfigError, match="sid_alpha"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.sid_alpha": "nan"})))
    assert not (tmp_path / "checkpoints").exists()


# -- the straight-through generator token (method.straight_through) -------------------------------------------------
class _ToyStudent(nn.Module):
    """A DD-student stand-in: per-position logits and continuous tokens from learnable tables (noise ignored)."""

    def __init__(self, length: int, v: int, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.codebook = torch.randn(v, d, generator=g)
        self.logits = nn.Parameter(torch.randn(length, v, generator=g))
        self.tokens = nn.Parameter(torch.randn(length, d, generator=g))

    def nearest_indices(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, self.codebook[None].expand(x.shape[0], -1, -1)).argmin(-1)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, t: torch.Tensor):
        b = labels.shape[0]
        return self.tokens.expand(b, -1, -1), self.logits.expand(b, -1, -1)


@pytest.mark.parametrize("output", ["logits", "continuous"])
def test_straight_through_token_is_the_sampled_code_with_the_soft_tokens_gradient(output: str) -> None:
    from dd.distill.dd2 import generator_sample

    student = _ToyStudent(length=5, v=7, d=3, seed=0)
    labels, noise = torch.zeros(2, dtype=torch.long), torch.zeros(2, 5, 3)
    probe = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    grads = []
    for straight in (False, True):
        student.zero_grad()
        sample = generator_sample(student, labels, noise, output, temperature=0.7, straight_through=straight)
        (sample.q * probe).sum().backward()
        grads.append(tuple(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for p in (student.logits, student.tokens)))
        if straight:
            torch.testing.assert_close(sample.q, student.codebook[sample.ids])  # the code dd.eval samples
        else:
            assert not torch.allclose(sample.q, student.codebook[sample.ids])  # a soft token, off the codebook
    for soft_grad, straight_grad in zip(*grads):
        torch.testing.assert_close(straight_grad, soft_grad)
    assert grads[0][0 if output == "logits" else 1].abs().sum() > 0  # the head the token comes from gets gradient


def test_soft_token_stays_float32_under_bf16_autocast() -> None:
    """Under ``trainer.precision=bf16-mixed`` the soft token q = softmax(logits) @ codebook is still computed in
    float32: DD2's generator moves q by small steps, and a bf16 matmul would round them away (~0.4% per entry)."""
    from dd.distill.dd2 import generator_sample

    student = _ToyStudent(length=5, v=7, d=3, seed=0)
    labels, noise = torch.zeros(2, dtype=torch.long), torch.zeros(2, 5, 3)
    exact = generator_sample(student, labels, noise, "logits").q
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generator_sample(student, labels, noise, "logits").q
        rounded = torch.softmax(student.logits.float(), -1).expand(2, -1, -1) @ student.codebook.float()
    assert mixed.dtype == torch.float32 and rounded.dtype == torch.bfloat16  # autocast would lower the matmul
    torch.testing.assert_close(mixed, exact, rtol=0, atol=0)


def test_guidance_head_runs_in_float32_under_bf16_autocast() -> None:
    """The guidance network's denoiser head F stays float32 under autocast (the trunk may run in bf16): the
    generator's loss is the small difference D_T - F."""
    from dd.distill.dd2 import DenoiseHead

    torch.manual_seed(0)
    head = DenoiseHead(feature_dim=16, token_dim=4, width=32, depth=2)
    features, x, s = torch.randn(2, 5, 16), torch.randn(2, 5, 4), torch.rand(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(features.bfloat16(), x, s)
        assert head.out(torch.randn(3, 32)).dtype == torch.bfloat16  # what autocast does to the head otherwise
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, head(features.bfloat16().float(), x, s), rtol=0, atol=0)


# -- Gumbel code draws (method.code_draw=gumbel) --------------------------------------------------------------------
def test_gumbel_codes_are_draws_from_the_generators_softmax_and_q_their_relaxation() -> None:
    from dd.distill.dd2 import generator_sample, gumbel_noise

    student = _ToyStudent(length=5, v=7, d=3, seed=0)
    draws = 6000
    labels, noise = torch.zeros(draws, dtype=torch.long), torch.zeros(draws, 5, 3)
    gumbel = gumbel_noise((draws, 5, 7), torch.Generator().manual_seed(2), "cpu")
    assert torch.isfinite(gumbel).all()
    sample = generator_sample(student, labels, noise, "logits", temperature=0.7, gumbel=gumbel)
    probs = torch.softmax(student.logits.detach(), -1)
    frequencies = torch.nn.functional.one_hot(sample.ids, 7).float().mean(0)
    assert (frequencies - probs).abs().max() < 0.03, (frequencies, probs)  # binomial std <= 0.0065 per cell
    assert (sample.ids != student.logits.argmax(-1)).any()  # draws, not the argmax
    relaxed = torch.softmax((student.logits.detach() + gumbel) / 0.7, -1) @ student.codebook
    torch.testing.assert_close(sample.q, relaxed)
    sharp = generator_sample(student, labels[:50], noise[:50], "logits", temperature=1e-3, gumbel=gumbel[:50])
    top2 = (student.logits.detach() + gumbel[:50]).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # away from ties, the relaxation's limit is the drawn code
    assert clear.float().mean() > 0.8
    torch.testing.assert_close(sharp.q[clear], student.codebook[sharp.ids][clear])
    sample.q.sum().backward()
    assert student.logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logits output"):
        generator_sample(student, labels[:2], noise[:2], "continuous", gumbel=gumbel[:2])


def test_gumbel_code_draw_trains_on_draws_validates_on_the_argmax_and_repeats_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dd.tasks.dd2 as task_module
    from dd.runs import ConfigError
    from dd.train import run as run_train

    calls = []
    original = task_module.generator_sample

    def recording(student, labels, noise, output="logits", temperature=1.0, straight_through=False, gumbel=None):
        sample = original(student, labels, noise, output, temperature, straight_through, gumbel)
        calls.append((student.training, gumbel is not None, torch.equal(sample.ids, sample.logits.argmax(-1))))
        return sample

    monkeypatch.setattr(task_module, "generator_sample", recording)
    exports = []
    for run in ("a", "b"):
        summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path / run, "gpt_test",
                                                                 **{"method.code_draw": "gumbel"})))
        assert summary["global_step"] == 10
        exports.append(_ema_and_raw(torch.load(summary["export"], weights_only=True), "gpt_test"))
    training = [c for c in calls if c[0]]
    validation = [c for c in calls if not c[0]]
    assert len(training) == 20 and all(gumbel for _, gumbel, _ in training)  # GTS and DD2 batches, both runs
    assert not all(argmax for _, _, argmax in training)  # the codes are draws
    assert validation and all(not gumbel and argmax for _, gumbel, argmax in validation)  # as dd.eval samples
    for state_a, state_b in zip(*exports):
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), name
    with pytest.raises(ConfigError, match="code_draw"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path / "bad", "gpt_test", **{"method.code_draw": "sample"})))
    with pytest.raises(ConfigError, match="generator_output=logits"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path / "bad", "gpt_test", **{
            "method.code_draw": "gumbel", "method.generator_output": "continuous"})))


# -- method.lr_decay ------------------------------------------------------------------------------------------------
def test_cosine_decay_falls_from_the_base_rate_to_the_floor_after_warm_up() -> None:
    import math
    from types import SimpleNamespace

    from dd.tasks.dd2 import DD2Config, DD2Task

    def rates(config: DD2Config, steps: list[int], total: int) -> list[float]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        out = []
        for step in steps:
            DD2Task._schedule_lr(SimpleNamespace(config=config), optimizer, 2e-4, step, total)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    cosine = DD2Config(lr_decay="cosine", min_lr_ratio=0.1, warmup_steps=10)
    got = rates(cosine, [0, 9, 50, 100, 150], total=100)
    assert got[0] == pytest.approx(2e-4 / 10)  # warm-up first
    assert got[1] == pytest.approx(2e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09))))
    assert got[2] == pytest.approx(2e-4 * 0.55)  # halfway: the mean of base and floor
    assert got[3] == pytest.approx(2e-5) and got[4] == pytest.approx(2e-5)  # the floor, and it stays there
    constant = DD2Config(lr_decay="none", warmup_steps=10)
    assert rates(constant, [50, 100], total=100) == pytest.approx([2e-4, 2e-4])  # none: constant after warm-up
    with pytest.raises(ValueError, match="lr_decay"):
        DD2Config(lr_decay="linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        DD2Config(lr_decay="cosine", min_lr_ratio=1.5)
