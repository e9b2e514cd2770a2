"""Student training mechanics on the random gpt_test preset: losses, resume exactness, DDP, export round trip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dd.checkpoint import read_checkpoint
from dd.distill.losses import LossConfig, dd_loss, sample_timesteps
from dd.generate_pairs import run as run_pairs
from dd.models.llamagen import make_spec
from dd.runs import ConfigError
from dd.train import run as run_train

from test_pairs import compose_cfg


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=640", "shard_size=160",
                                             f"output_dir={out}"]))
    return out / "pairs"


def _train_overrides(pairs: Path, out: Path, **extra: object) -> list[str]:
    base = {"model": "gpt_test", "data.pairs_dir": str(pairs), "output_dir": str(out),
            "max_steps": 24, "batch_size": 16, "val_every_steps": 12, "ckpt_every": 6, "log_every": 1,
            "optim.warmup_steps": 4, "limit_val_batches": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_loss_masks_given_positions_and_split() -> None:
    spec = make_spec(**compose_cfg("train", ["model=gpt_test"])["model"])
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    ids = torch.randint(0, 64, (2, 16))
    noise = torch.randn(2, 16, 8)
    labels = torch.tensor([0, 1])
    full = dd_loss(student, labels, ids, noise, torch.tensor([0, 0]), student.codebook, LossConfig(split_t=0))
    assert full.ce > 0 and full.mse > 0
    # with every position given there is nothing to predict: ce and mse are exactly zero
    none = dd_loss(student, labels, ids, noise, torch.tensor([16, 16]), student.codebook, LossConfig(split_t=0))
    assert none.ce == 0 and none.mse == 0
    # mse only counts positions >= max(t, split_t)
    split = dd_loss(student, labels, ids, noise, torch.tensor([0, 12]), student.codebook, LossConfig(split_t=8))
    data = student.codebook[ids]
    with torch.no_grad():
        tokens, _ = student(student.perturb(data, torch.tensor([0, 12]), noise), labels, torch.tensor([0, 12]))
    err = (tokens - data).pow(2).mean(-1)
    expected = (err[0, 8:].sum() + err[1, 12:].sum()) / (8 + 4)
    torch.testing.assert_close(split.mse, expected)
    counts = torch.bincount(sample_timesteps([0, 8], 4000, torch.Generator().manual_seed(0)))
    assert abs(counts[0].item() - 2000) < 150 and abs(counts[8].item() - 2000) < 150


def test_bad_train_settings_fail_early(pairs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strictly increasing"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, **{"schedule.t_list": "[0,8,4]"})))
    with pytest.raises(ConfigError, match="split_t=40 outside the valid range 0..16"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, **{"schedule.split_t": 40})))
    with pytest.raises(ConfigError, match="no pairs at"):
        run_train(compose_cfg("train", _train_overrides(tmp_path / "nothing", tmp_path)))


def test_short_training_lowers_loss_and_exports_official_layout(pairs_dir: Path, tmp_path: Path) -> None:
    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path)))
    assert summary["global_step"] == 24
    metrics = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    loss_col = header.index("train/loss")
    losses = [float(row.split(",")[loss_col]) for row in metrics[1:] if row.split(",")[loss_col]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, "training did not lower the loss"
    assert any("val/token_acc_t0" in h for h in header) and any("val/sample_token_acc_2step" in h for h in header)
    export = read_checkpoint(summary["export"])
    assert set(export) == {"ema", "model"}
    spec = make_spec(**compose_cfg("train", ["model=gpt_test"])["model"])
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=summary["export"])
    assert torch.equal(student.n_d_embed.weight, export["ema"]["n_d_embed.weight"])
    assert not torch.equal(export["ema"]["n_d_embed.weight"], export["model"]["n_d_embed.weight"])
    assert (Path(summary["export"] + ".json")).is_file()


def _cli(pairs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dd.train", *_train_overrides(pairs, out), "logger=none", *extra]


def test_resume_after_kill_continues_exactly(pairs_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(pairs_dir, straight), cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_cli(pairs_dir, killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not last.is_file():
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(last, weights_only=True)["global_step"]
    assert 6 <= step < 24, f"kill landed at step {step}"
    assert not (killed / "export").exists()
    subprocess.run(_cli(pairs_dir, killed, "resume=auto"), cwd=tmp_path, env=env, check=True, capture_output=True)
    a = read_checkpoint(straight / "export" / "student_ema.pt")
    b = read_checkpoint(killed / "export" / "student_ema.pt")
    for key in ("ema", "model"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], atol=1e-6, rtol=1e-6, msg=name)


def test_ddp_two_cpu_ranks_trains(pairs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(_cli(pairs_dir, out, "trainer.devices=2", "max_steps=6", "val_every_steps=6"),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    export = read_checkpoint(out / "export" / "student_ema.pt")
    assert set(export) == {"ema", "model"}
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_wandb_offline_logger_and_bf16_mixed_on_cpu(pairs_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=wandb works with no network in offline mode (a local run folder, no connection), and bf16-mixed runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path / "run", max_steps=4,
                                                              val_every_steps=4, ckpt_every=4,
                                                              logger="wandb", **{"trainer.precision": "bf16-mixed"})))
    assert summary["global_step"] == 4
    assert list((tmp_path / "run").rglob("offline-run-*")), "wandb wrote no offline run folder"
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["metrics"].items() if k.startswith("train/"))


@pytest.mark.slow
def test_compiled_student_trains(pairs_dir: Path, tmp_path: Path) -> None:
    """compile=true routes the loss through torch.compile (first compile costs ~30-60 s on CPU, hence slow)."""
    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, max_steps=3, val_every_steps=3,
                                                              ckpt_every=3, compile="true")))
    assert summary["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["metrics"].items() if k.startswith("train/"))
