"""DD2's guidance-network forms (``method.guidance``): direct (the paper's AR-diffusion head) and residual (the
analytic teacher denoiser plus a learned correction).

Checked: the residual form starts as the teacher's denoiser exactly (so the generator's distillation gradient is
zero before the guidance network has seen a generated sample), learns a correction from samples that are not the
teacher's, and the trainer runs end to end with it on both test presets and refuses a GTS phase that would fit
nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd.distill.dd2 import (ARDenoiser, fake_score_loss, frozen_fake_denoiser, noised, sid_generator_loss,
                            teacher_denoised_at, teacher_denoiser_fn)

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


@pytest.mark.parametrize("loss_form", ["sid", "dmd"])
def test_dd2_trains_with_residual_guidance(preset: str, loss_form: str, tmp_path: Path) -> None:  # noqa: F811
    from dd.train import run as run_train

    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path, preset, max_steps=6, **{
        "method.guidance": "residual", "method.gts_steps": 0, "method.loss_form": loss_form})))
    assert summary["global_step"] == 6
    metrics = summary["metrics"]
    assert {"train/loss", "train/dd2_signal", "train/dd2_fake"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert float(state["fake.head.out.weight"].abs().max()) > 0  # the zero-initialised correction has learned


def test_residual_guidance_is_refused_with_gts_steps(tmp_path: Path) -> None:
    from dd.runs import ConfigError
    from dd.train import run as run_train

    with pytest.raises(ConfigError, match=r"method\.guidance=residual.*set method\.gts_steps=0"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.guidance": "residual"})))
    with pytest.raises(ConfigError, match=r"method\.guidance='dsm'.*direct, residual"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.guidance": "dsm",
                                                                                "method.gts_steps": 0})))
    assert not (tmp_path / "checkpoints").exists()



def test_dd2_defaults_come_from_the_method_and_the_preset() -> None:
    """method=dd2 brings its recommended batch size (8) and the preset may name its DD2 learning-rate decay
    (var_tiny: none); explicit overrides win, and DD keeps its own batch size."""
    assert compose_cfg("train", [])["batch_size"] == 64
    gpt = compose_cfg("train", ["method=dd2"])
    assert gpt["batch_size"] == 8 and gpt["method"]["lr_decay"] == "cosine"
    var = compose_cfg("train", ["method=dd2", "model=var_tiny"])
    assert var["batch_size"] == 8 and var["method"]["lr_decay"] == "none"
    given = compose_cfg("train", ["method=dd2", "model=var_tiny", "batch_size=32", "method.lr_decay=cosine"])
    assert given["batch_size"] == 32 and given["method"]["lr_decay"] == "cosine"
