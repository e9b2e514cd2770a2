"""DD2 (conditional score distillation): the analytic teacher score, the losses and the trainer.

The losses are checked against independent computations: the score against finite differences of the mixture's
log-density, the denoiser against the flow map's ``posterior_mean``, the generator gradient against its closed form
(and that it vanishes when the guidance network equals the teacher), and a guidance network fitted on the teacher's
own samples against the analytic denoiser. The trainer runs end to end on the random-weight test presets, exports a
student that ``dd.eval`` samples, and resumes exactly after a kill.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dd.distill.dd2 import (ARDenoiser, analytic_denoiser, fake_score_loss, generator_loss, mixture_log_density,
                            noised, score_from_denoiser, teacher_denoised_at)
from dd.flow import posterior_mean
from dd.sampling.choosers import inverse_cdf
from dd.sampling.logits import SamplingConfig

from test_pairs import PRESETS, build_spec, compose_cfg
from test_train import _ema_and_raw, _kill_after_a_checkpoint


def _mixture(n: int, v: int, d: int, seed: int, top_k: int | None = None):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, d, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    if top_k is not None:
        threshold = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=1)
    s = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, s, log_probs, codebook


@pytest.mark.parametrize("top_k", [None, 3])
def test_analytic_score_matches_finite_differences_of_the_log_density(top_k: int | None) -> None:
    x, s, log_probs, codebook = _mixture(12, 16, 4, seed=0, top_k=top_k)
    # float64 end to end: the denoiser's arithmetic is float32, so compare it to the float64 finite differences
    # within float32 accuracy, scaled by 1/s^2
    score = score_from_denoiser(x, s, analytic_denoiser(x, s, log_probs, codebook).double())
    h = 1e-5
    fd = torch.empty_like(x)
    for j in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, j] = h
        fd[:, j] = (mixture_log_density(x + step, s, log_probs, codebook)
                    - mixture_log_density(x - step, s, log_probs, codebook)) / (2 * h)
    torch.testing.assert_close(score, fd, rtol=2e-3, atol=2e-4 / float(s.min()) ** 2)


def test_analytic_denoiser_agrees_with_the_flow_maps_posterior_mean() -> None:
    x, _, log_probs, codebook = _mixture(20, 32, 8, seed=1, top_k=5)
    for level in (0.1, 0.5, 0.9, 1.0):
        s = torch.full((20,), level, dtype=torch.float64)
        ours = analytic_denoiser(x.float(), s.float(), log_probs.float(), codebook.float())
        ref = posterior_mean(x.float(), level, log_probs.float(), codebook.float())
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # s = 1: the prior mean E_p[c]; s -> 0: the code nearest to x / (1 - s)
    ones = analytic_denoiser(x.float(), torch.ones(20), log_probs.float(), codebook.float())
    torch.testing.assert_close(ones, (log_probs.exp() @ codebook).float(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(analytic_denoiser(x.float(), torch.full((20,), 1e-3), log_probs.float(),
                                            codebook.float())).all()


def test_generator_gradient_is_fake_minus_teacher_and_vanishes_when_they_agree() -> None:
    torch.manual_seed(0)
    b, length, d, v = 3, 5, 4, 7
    codebook = torch.randn(v, d)
    log_probs = torch.log_softmax(torch.randn(b, length, v), dim=-1)
    q = torch.randn(b, length, d, requires_grad=True)
    s, eps = torch.rand(b, length) * 0.9 + 0.05, torch.randn(b, length, d)
    x = noised(q.detach(), s, eps)
    teacher = teacher_denoised_at(x, s, log_probs, codebook)
    generator_loss(q, teacher, teacher.clone()).loss.backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) == 0
    q.grad = None
    fake = teacher + 0.1 * torch.randn_like(teacher)
    terms = generator_loss(q, teacher, fake, normalize=False)
    terms.loss.backward()
    torch.testing.assert_close(q.grad, (fake - teacher) / b)  # mean over the batch, sum over positions
    q.grad = None
    generator_loss(q, teacher, fake, normalize=True).loss.backward()
    weight = 1.0 / ((q.detach() - teacher).abs().mean(dim=(1, 2), keepdim=True) + 1e-6)
    torch.testing.assert_close(q.grad, weight * (fake - teacher) / b)


# -- the family side (teacher_log_probs, feature_trunk) on the test presets -----------------------------------------------
@pytest.fixture(scope="module", params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


def _teacher_samples(family, sampling: SamplingConfig, labels: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)

    def chooser(log_probs: torch.Tensor, position: int) -> torch.Tensor:
        u = 1.0 - torch.rand(log_probs.shape[:-1], generator=g, dtype=torch.float64)
        return inverse_cdf(log_probs.exp(), u)

    return family.teacher_generate(labels, 0, family.num_timesteps, None, sampling, chooser)


@pytest.mark.slow
def test_guidance_network_fitted_on_teacher_samples_approaches_the_analytic_denoiser(preset: str) -> None:
    """Score matching on the teacher's own samples has the teacher's denoiser as its optimum: after fitting, the
    network's error against the analytic denoiser is a small fraction of what it was at initialisation."""
    torch.manual_seed(0)
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    family = spec.build_family()
    sampling = SamplingConfig(cfg_scale=1.5, top_k=8)
    codebook = family.codebook().float().detach()
    fake = ARDenoiser(family.feature_trunk(), family.token_dim, width=128, depth=3,
                      token_var=float(codebook.pow(2).mean()))
    optimizer = torch.optim.Adam(fake.parameters(), lr=2e-3)
    num_classes = family.num_classes

    def batch(seed: int, size: int = 64):
        labels = torch.randint(num_classes, (size,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ids = _teacher_samples(family, sampling, labels, seed)
        g = torch.Generator().manual_seed(seed + 1)
        s = 0.1 + 0.8 * torch.rand(ids.shape, generator=g)
        eps = torch.randn(*ids.shape, family.token_dim, generator=g)
        return labels, ids, s, eps

    held = batch(10_000, 128)
    with torch.no_grad():
        log_probs = family.teacher_log_probs(held[0], held[1], sampling)
        x = noised(codebook[held[1]], held[2], held[3])
        target = teacher_denoised_at(x, held[2], log_probs, codebook)

    def error() -> float:
        with torch.no_grad():
            return float((fake(held[0], held[1], x, held[2]) - target).pow(2).sum(-1).mean())

    before = error()
    for step in range(600):
        labels, ids, s, eps = batch(step)
        loss = fake_score_loss(fake, labels, ids, codebook[ids], s, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    print(f"{preset}: error vs analytic denoiser {before:.4f} -> {after:.4f}")
    assert after < 0.3 * before, (before, after)  # measured: gpt_test 0.499 -> 0.104, var_test 0.491 -> 0.059


# -- the trainer ----------------------------------------------------------------------------------------------------
def _dd2_overrides(out: Path, preset: str, **extra: object) -> list[str]:
    base = {"model": preset, "method": "dd2", "output_dir": str(out), "max_steps": 10, "batch_size": 8,
            "method.gts_steps": 4, "method.warmup_steps": 2, "method.val_samples": 16, "method.head_width": 32,
            "val_every_steps": 5, "ckpt_every": 3, "log_every": 1, "limit_val_batches": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_dd2_trains_exports_and_dd_eval_samples_the_generator(preset: str, tmp_path: Path) -> None:
    from dd.eval import run as run_eval
    from dd.train import run as run_train

    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path / "train", preset, snapshot_every=5)))
    assert summary["global_step"] == 10  # one Lightning step per batch, GTS batches included
    metrics = summary["metrics"]
    assert {"train/dd2_fake", "train/teacher_nll", "val/teacher_nll", "val/pairwise_token_diversity"} <= set(metrics)
    ema, raw = _ema_and_raw(torch.load(summary["export"], weights_only=True), preset)
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    family = spec.build_family()
    teacher_init = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher).state_dict()
    assert set(ema) == set(teacher_init) and any(not torch.equal(ema[k], teacher_init[k]) for k in ema)
    import json

    info = json.loads(Path(summary["export"] + ".json").read_text())
    assert info["method"] == "dd2" and info["schedule"] == {"t_list": [0], "split_t": spec.num_timesteps}
    assert info["training_seed_range"] == [1_000_000_000, 1_000_000_000 + 8 * 10 - 1]  # fresh noise per step
    payload = run_eval(compose_cfg("eval", [f"model={preset}", "sampler=fewstep", "schedule.t_list=[0]",
                                            f"schedule.split_t={spec.num_timesteps}", "metrics.enabled=false",
                                            f"student.checkpoint={summary['export']}", "num_samples=4",
                                            f"output_dir={tmp_path / 'eval'}"]))
    assert payload["steps"] == 1


def test_dd2_settings_are_checked_before_training(tmp_path: Path) -> None:
    from dd.runs import ConfigError
    from dd.train import run as run_train

    with pytest.raises(ConfigError, match="generator_output"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.generator_output": "probs"})))
    with pytest.raises(ConfigError, match="s_min"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.s_min": 0})))
    with pytest.raises(ConfigError, match="bf16-mixed"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"trainer.precision": "16-mixed"})))
    assert not (tmp_path / "checkpoints").exists()


def test_dd2_and_dd_runs_of_a_model_write_to_different_folders() -> None:
    """Without an output_dir, `dd.train method=dd2` writes beside the model's DD run, never into it (resume=auto
    would refuse the DD checkpoint, and resume=never would replace the DD export a DD2 fine-tuning starts from)."""
    dd, dd2 = (compose_cfg("train", ["model=gpt_tiny", *extra]) for extra in ([], ["method=dd2"]))
    assert dd["output_dir"] == "outputs/train/gpt_tiny" and dd2["output_dir"] == "outputs/train/gpt_tiny_dd2"
    assert compose_cfg("train", ["model=var_tiny", "method=dd2"])["run_name"] == "var_tiny_dd2"


def test_dd2_draws_fresh_noise_for_every_step_on_every_rank(tmp_path: Path) -> None:
    """The default noise pool covers max_steps batches of every rank, so a DDP run never replays (label, noise)."""
    from dd.tasks.dd2 import build_dd2_task

    for devices in (1, 2):
        cfg = compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", max_steps=30, **{"trainer.devices": devices}))
        spec = build_spec(cfg)
        task = build_dd2_task(cfg, spec, spec.build_family())
        assert len(task.train_data) == 8 * devices * 30


@pytest.mark.slow  # subprocess runs, ~30 s: DD's own resume test (tests/test_train.py) covers the mechanism by default
def test_dd2_resume_after_kill_continues_exactly(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def cli(out: Path, *extra: str, steps: int) -> list[str]:
        return [sys.executable, "-m", "dd.train", *_dd2_overrides(out, "gpt_test", max_steps=steps), "logger=none",
                *extra]

    for steps in (30, 120):
        killed = tmp_path / f"killed{steps}"
        step = _kill_after_a_checkpoint(cli(killed, steps=steps), killed, env)
        if step is not None and step < steps:
            break
    else:
        pytest.fail(f"every run reached its last step before the kill landed (last: step {step})")
    subprocess.run(cli(killed, "resume=auto", steps=steps), cwd=tmp_path, env=env, check=True, capture_output=True)
    straight = tmp_path / f"straight{steps}"
    subprocess.run(cli(straight, steps=steps), cwd=tmp_path, env=env, check=True, capture_output=True)
    a = _ema_and_raw(torch.load(straight / "export" / "student_ema.pt", weights_only=True), "gpt_test")
    b = _ema_and_raw(torch.load(killed / "export" / "student_ema.pt", weights_only=True), "gpt_test")
    for state_a, state_b in zip(a, b):
        for name in state_a:
            torch.testing.assert_close(state_b[name], state_a[name], atol=1e-6, rtol=1e-6, msg=name)


def test_dd2_with_the_dd_regression_term_trains_on_pairs(tmp_path: Path) -> None:
    """method.dd_weight > 0 (DD + DD2): batches come from the pairs, the regression term is logged; without pairs the
    run stops before training with DD's clean message."""
    from dd.generate_pairs import run as run_pairs
    from dd.runs import ConfigError
    from dd.train import run as run_train

    with pytest.raises(ConfigError, match="no pairs at"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path / "none", "gpt_test", **{
            "method.dd_weight": 1.0, "data.pairs_dir": str(tmp_path / "missing")})))
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=64", f"output_dir={tmp_path / 'gen'}"]))
    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path / "train", "gpt_test", **{
        "method.dd_weight": 1.0, "data.pairs_dir": str(tmp_path / "gen" / "pairs"), "data.val_every": 4})))
    assert summary["global_step"] == 10 and "train/dd2_regression" in summary["metrics"]
    assert summary["metrics"]["train/dd2_regression"] > 0


@pytest.mark.slow  # two CPU ranks in a subprocess
def test_dd2_trains_on_two_cpu_ranks(tmp_path: Path) -> None:
    """trainer.devices=2: DDP with the unused-parameter detection DD2's alternating updates need (set by dd.train)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "dd.train", *_dd2_overrides(out, "gpt_test", max_steps=6),
                             "trainer.devices=2", "logger=none"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    _ema_and_raw(torch.load(out / "export" / "student_ema.pt", weights_only=True), "gpt_test")


def test_dd2_runs_under_bf16_mixed(tmp_path: Path) -> None:
    """trainer.precision=bf16-mixed (CPU autocast): the analytic denoiser and the losses stay float32, values finite."""
    from dd.train import run as run_train

    summary = run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", max_steps=6,
                                                             **{"trainer.precision": "bf16-mixed"})))
    assert summary["global_step"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["metrics"].values())
