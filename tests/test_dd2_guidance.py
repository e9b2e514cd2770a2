"""DD2's guidance-network forms (``method.guidance``): direct (the paper's AR-diffusion head), residual (the analytic
teacher denoiser plus a learned correction) and categorical (the teacher's per-position distribution plus a learned
logit correction, fitted by maximum likelihood on the generator's codes).

Checked: both new forms start as the teacher exactly (so the generator's distillation gradient is zero before the
guidance network has seen a generated sample), the categorical one recovers a known conditional distribution from
samples, each learns (its parameters move and its loss falls), and the trainer runs end to end with each on both
test presets and refuses a GTS phase that would fit nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd.distill.dd2 import (ARDenoiser, CategoricalGuidance, categorical_guidance_loss, fake_score_loss,
                            frozen_fake_denoiser, noised, sid_generator_loss, teacher_denoised_at,
                            teacher_denoiser_fn)

from test_dd2 import _dd2_overrides, preset  # noqa: F401  (preset: the both-families fixture)
from test_dd2_sid import TinyTrunk, _tokens
from test_pairs import compose_cfg


def _sequence(b: int, length: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, (b,), generator=g), torch.randint(v, (b, length), generator=g)


def test_residual_guidance_starts_as_the_teacher_denoiser_and_learns_a_correction() -> None:
    torch.manual_seed(0)
    codebook, log_probs, q, s, eps = _tokens(4, 6, 4, 9, seed=1)
    labels, ids = _sequence(4, 6, 9, seed=2)
    fake = ARDenoiser(TinyTrunk(9, 3), token_dim=4, width=16, depth=2, residual=True)
    x = noised(q.detach(), s, eps)
    teacher = teacher_denoiser_fn(s, log_probs, codebook)
    base = teacher_denoised_at(x, s, log_probs, codebook)
    torch.testing.assert_close(fake(labels, ids, x, s, base=base), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="base"):
        fake(labels, ids, x, s)
    # before any update the SiD generator loss and its gradient vanish (the guidance network is the teacher)
    terms = sid_generator_loss(q, s, eps, teacher, frozen_fake_denoiser(fake, labels, ids, s))
    (grad,) = torch.autograd.grad(terms.loss, q)
    assert float(terms.loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0
    # score matching on tokens that are not the teacher's (its codes shifted by 0.5) teaches the correction the
    # shift: at a low noise level the network's error to the tokens falls well below the teacher denoiser's
    optimizer = torch.optim.Adam(fake.parameters(), lr=1e-2)
    tokens = codebook[ids] + 0.5
    low = torch.full((4, 6), 0.1)
    x_low = noised(tokens, low, eps)
    base_low = teacher_denoised_at(x_low, low, log_probs, codebook)

    def error() -> float:
        with torch.no_grad():
            return float((fake(labels, ids, x_low, low, base=base_low) - tokens).pow(2).sum(-1).mean())

    before = error()
    for step in range(150):
        g = torch.Generator().manual_seed(100 + step)
        s_step, eps_step = 0.05 + 0.9 * torch.rand(4, 6, generator=g), torch.randn(4, 6, 4, generator=g)
        loss = fake_score_loss(fake, labels, ids, tokens, s_step, eps_step,
                               teacher_denoiser=teacher_denoiser_fn(s_step, log_probs, codebook))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    assert after < 0.3 * before, (before, after)
    with pytest.raises(ValueError, match="teacher_denoiser"):
        fake_score_loss(fake, labels, ids, tokens, low, eps)
    terms = sid_generator_loss(q, s, eps, teacher, frozen_fake_denoiser(fake, labels, ids, s))
    (grad,) = torch.autograd.grad(terms.loss, q)
    assert float(grad.abs().max()) > 1e-3


def test_categorical_guidance_starts_as_the_teacher_distribution() -> None:
    codebook, log_probs, q, s, eps = _tokens(3, 5, 4, 9, seed=3)
    labels, ids = _sequence(3, 5, 9, seed=4)
    fake = CategoricalGuidance(TinyTrunk(9, 3), vocab_size=9, width=16, depth=2)
    log_pi = fake(log_probs, labels, ids)
    torch.testing.assert_close(log_pi, log_probs, rtol=0, atol=1e-6)
    # a filtered teacher (top-k: -inf outside the support) still gives every code a finite likelihood
    filtered = log_probs.masked_fill(log_probs < log_probs.median(dim=-1, keepdim=True).values, float("-inf"))
    filtered = torch.log_softmax(filtered, dim=-1)
    log_pi = fake(filtered, labels, ids)
    assert torch.isfinite(log_pi).all() and torch.isfinite(categorical_guidance_loss(log_pi, ids))
    kept = torch.isfinite(filtered)
    torch.testing.assert_close(log_pi.exp()[kept], filtered.exp()[kept], rtol=0, atol=1e-6)
    # its analytic denoiser is the teacher's: the SiD generator loss and gradient vanish before any update
    teacher = teacher_denoiser_fn(s, log_probs, codebook)
    fake_denoiser = teacher_denoiser_fn(s, fake(log_probs, labels, ids).detach(), codebook)
    terms = sid_generator_loss(q, s, eps, teacher, fake_denoiser)
    (grad,) = torch.autograd.grad(terms.loss, q)
    assert float(grad.abs().max()) < 1e-5


def test_categorical_guidance_recovers_the_generators_conditional_distribution() -> None:
    """Codes drawn from a known first-order chain (the next code's distribution depends on the previous code) differ
    from the teacher's (uniform) distribution; maximum likelihood recovers the chain's transition table."""
    torch.manual_seed(0)
    v, length, classes = 5, 6, 3
    g = torch.Generator().manual_seed(5)
    transition = torch.softmax(3.0 * torch.randn(v + 1, v, generator=g), dim=-1)  # row v: the first position
    fake = CategoricalGuidance(TinyTrunk(v, classes), vocab_size=v, width=32, depth=2)
    optimizer = torch.optim.Adam(fake.parameters(), lr=3e-2)
    uniform = torch.full((64, length, v), -torch.log(torch.tensor(float(v))))

    def chain(batch: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        ids, previous = [], torch.full((batch,), v)
        for _ in range(length):
            previous = torch.multinomial(transition[previous], 1, generator=gen).squeeze(1)
            ids.append(previous)
        return torch.stack(ids, dim=1)

    labels = torch.zeros(64, dtype=torch.long)
    for step in range(300):
        ids = chain(64, step)
        loss = categorical_guidance_loss(fake(uniform, labels, ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids = chain(64, 10_000)
    with torch.no_grad():
        learned = fake(uniform, labels, ids).exp()
    previous = torch.cat([torch.full_like(ids[:, :1], v), ids[:, :-1]], dim=1)
    expected = transition[previous]
    tv = 0.5 * (learned - expected).abs().sum(-1)
    assert float(tv.max()) < 0.08, float(tv.max())  # the uniform start is off by 0.5 and more in total variation
    assert float(0.5 * (uniform.exp() - expected).abs().sum(-1).mean()) > 0.4


@pytest.mark.parametrize("guidance", ["residual", "categorical"])
def test_dd2_trains_with_each_guidance_form(preset: str, guidance: str, tmp_path: Path) -> None:  # noqa: F811
    from dd.train import run as run_train

    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path, preset, max_steps=6, **{
        "method.guidance": guidance, "method.gts_steps": 0})))
    assert summary["global_step"] == 6
    metrics = summary["metrics"]
    assert {"train/loss", "train/dd2_signal", "train/dd2_fake"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    head = "fake.out.weight" if guidance == "categorical" else "fake.head.out.weight"
    assert float(state[head].abs().max()) > 0  # the zero-initialised correction has learned something


def test_guidance_forms_without_gts_are_refused_with_gts_steps(tmp_path: Path) -> None:
    from dd.runs import ConfigError
    from dd.train import run as run_train

    for guidance in ("residual", "categorical"):
        with pytest.raises(ConfigError, match=rf"method\.guidance={guidance}.*set method\.gts_steps=0"):
            run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.guidance": guidance})))
    with pytest.raises(ConfigError, match=r"method\.guidance='dsm'.*direct, residual, categorical"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.guidance": "dsm",
                                                                                "method.gts_steps": 0})))
    assert not (tmp_path / "checkpoints").exists()


def test_frozen_guidance_trunk_stays_the_teachers(tmp_path: Path) -> None:
    """method.guidance_trunk=frozen: only the guidance head learns; the trunk keeps the teacher's weights."""
    from dd.runs import ConfigError
    from dd.train import run as run_train

    run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", max_steps=6, **{
        "method.guidance": "residual", "method.gts_steps": 0, "method.guidance_trunk": "frozen"})))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    trunk = {k[len("fake.trunk.model."):]: v for k, v in state.items() if k.startswith("fake.trunk.model.")}
    assert trunk and all(torch.equal(v, teacher[k]) for k, v in trunk.items())
    assert float(state["fake.head.out.weight"].abs().max()) > 0
    with pytest.raises(ConfigError, match="guidance_trunk=frozen needs method.guidance=residual or categorical"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path / "direct", "gpt_test", **{
            "method.guidance_trunk": "frozen"})))
