"""Student training mechanics on the random presets of both families (gpt_test; var_test, whose timesteps are
scales): losses, resume exactness, DDP, export round trip. Tests of Lightning plumbing only (bad settings, wandb,
bf16, compile) run on gpt_test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dd.checkpoint import read_checkpoint
from dd.distill.losses import LossConfig, dd_loss, sample_timesteps
from dd.generate_pairs import run as run_pairs
from dd.runs import ConfigError
from dd.tasks.snapshots import list_snapshots
from dd.train import run as run_train

from test_pairs import PRESETS, build_spec, compose_cfg

#: tests about Lightning plumbing only: one family is enough
GPT_ONLY = pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)


@pytest.fixture(scope="module", params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pairs_dir(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"pairs_{preset}")
    run_pairs(compose_cfg("generate_pairs", [f"model={preset}", "num_pairs=640", "shard_size=160",
                                             f"output_dir={out}"]))
    return out / "pairs"


def _train_overrides(pairs: Path, out: Path, **extra: object) -> list[str]:
    base = {"model": "gpt_test", "data.pairs_dir": str(pairs), "output_dir": str(out),
            "max_steps": 24, "batch_size": 16, "val_every_steps": 12, "ckpt_every": 6, "log_every": 1,
            "optim.warmup_steps": 4, "limit_val_batches": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


#: per preset: (sequence length, last timestep, timesteps of the split case, split_t, leading data tokens of
#: those timesteps, data tokens before the split). LlamaGen counts tokens; VAR counts scales (1, 2, 3, 4 -> 0, 1, 5,
#: 14, 30 tokens).
LOSS_CASES = {"gpt_test": (16, 16, (0, 12), 8, (0, 12), 8), "var_test": (30, 4, (0, 3), 2, (0, 14), 5)}


def _ema_and_raw(export: dict[str, Any], preset: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The EMA and raw weights of an exported student, checking its family's official layout: {'ema', 'model'}
    (LlamaGen-DD, ``eval_fewstep.py --ema``) or {'trainer': {'ema_parameters', 'var_wo_ddp'}} (VAR-DD)."""
    if preset == "var_test":
        assert set(export) == {"trainer"} and set(export["trainer"]) == {"ema_parameters", "var_wo_ddp"}
        return export["trainer"]["ema_parameters"], export["trainer"]["var_wo_ddp"]
    assert set(export) == {"ema", "model"}
    return export["ema"], export["model"]


def test_loss_masks_given_positions_and_split(preset: str) -> None:
    length, last, t_split, split_t, given, split_tokens = LOSS_CASES[preset]
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    assert family.sequence_length == length and family.num_timesteps == last
    assert student.num_data_tokens(torch.tensor(t_split)).tolist() == list(given)
    assert int(student.num_data_tokens(split_t)) == split_tokens
    ids = torch.randint(0, 64, (2, length))
    noise = torch.randn(2, length, family.token_dim)
    labels = torch.tensor([0, 1])
    full = dd_loss(student, labels, ids, noise, torch.tensor([0, 0]), student.codebook, LossConfig(split_t=0))
    assert full.ce > 0 and full.mse > 0
    # with every position given there is nothing to predict: ce and mse are exactly zero
    none = dd_loss(student, labels, ids, noise, torch.tensor([last, last]), student.codebook, LossConfig(split_t=0))
    assert none.ce == 0 and none.mse == 0
    # ce counts positions >= n(t); mse only positions >= max(n(t), n(split_t))
    t = torch.tensor(t_split)
    split = dd_loss(student, labels, ids, noise, t, student.codebook, LossConfig(split_t=split_t))
    data = student.codebook[ids]
    with torch.no_grad():
        tokens, logits = student(student.perturb(data, t, noise), labels, t)
    err = (tokens - data).pow(2).mean(-1)
    first = [max(n, split_tokens) for n in given]
    expected = (err[0, first[0]:].sum() + err[1, first[1]:].sum()) / (2 * length - sum(first))
    torch.testing.assert_close(split.mse, expected)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(split.ce, (ce[0, given[0]:].sum() + ce[1, given[1]:].sum()) / (2 * length - sum(given)))
    t_list = list(spec.default_t_list)
    counts = torch.bincount(sample_timesteps(t_list, 4000, torch.Generator().manual_seed(0)))
    assert abs(counts[t_list[0]].item() - 2000) < 150 and abs(counts[t_list[1]].item() - 2000) < 150


@GPT_ONLY
def test_bad_train_settings_fail_early(pairs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strictly increasing"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, **{"schedule.t_list": "[0,8,4]"})))
    with pytest.raises(ConfigError, match="split_t=40 outside the valid range 0..16"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, **{"schedule.split_t": 40})))
    with pytest.raises(ConfigError, match="no pairs at"):
        run_train(compose_cfg("train", _train_overrides(tmp_path / "nothing", tmp_path)))
    with pytest.raises(ConfigError, match="optim: optim.decay='step': expected one of cosine, linear"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, **{"optim.decay": "step"})))
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_short_training_lowers_loss_and_exports_official_layout(preset: str, pairs_dir: Path, tmp_path: Path) -> None:
    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, model=preset, snapshot_every=12)))
    assert summary["global_step"] == 24
    metrics = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    loss_col = header.index("train/loss")
    losses = [float(row.split(",")[loss_col]) for row in metrics[1:] if row.split(",")[loss_col]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, "training did not lower the loss"
    assert any("val/token_acc_t0" in h for h in header) and any("val/sample_token_acc_2step" in h for h in header)
    ema, raw = _ema_and_raw(read_checkpoint(summary["export"]), preset)
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=summary["export"])
    assert torch.equal(student.n_d_embed.weight, ema["n_d_embed.weight"])
    assert set(student.state_dict()) == set(ema) == set(raw)
    assert all(torch.equal(v, ema[k]) for k, v in student.state_dict().items())
    assert not torch.equal(ema["n_d_embed.weight"], raw["n_d_embed.weight"])
    final_info = json.loads(Path(summary["export"] + ".json").read_text())
    assert final_info["training_seed_range"] == [0, 639]  # the pairs' seeds: dd.eval warns when it samples them
    # snapshot_every=12: EMA exports at steps 12 and 24 with their training time; the last one is the final export
    snapshots = list_snapshots(tmp_path / "export")
    assert [p.name for p in snapshots] == ["student_ema_step0000012.pt", "student_ema_step0000024.pt"]
    infos = [json.loads(Path(str(p) + ".json").read_text()) for p in snapshots]
    assert [i["global_step"] for i in infos] == [12, 24] and 0 < infos[0]["train_s"] < infos[1]["train_s"]
    assert infos[1]["train_s"] <= final_info["train_s"] and final_info["global_step"] == 24
    last_ema, _ = _ema_and_raw(read_checkpoint(snapshots[-1]), preset)
    assert all(torch.equal(last_ema[k], v) for k, v in ema.items())
    first_ema, _ = _ema_and_raw(read_checkpoint(snapshots[0]), preset)
    assert not torch.equal(first_ema["n_d_embed.weight"], ema["n_d_embed.weight"])


def _cli(pairs: Path, out: Path, preset: str, *extra: str, **settings: object) -> list[str]:
    return [sys.executable, "-m", "dd.train", *_train_overrides(pairs, out, model=preset, **settings), "logger=none",
            *extra]


def _kill_after_a_checkpoint(command: list[str], out: Path, env: dict[str, str]) -> int | None:
    """Start a training run, SIGKILL it once it has written a checkpoint (plus 0.3 s, so the kill may land between
    checkpoints); the step of its last checkpoint, or None when the run exited before the kill landed."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
        last = out / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not last.is_file() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # already exited and reaped
            pass
        returncode = proc.wait()
    if returncode == 0:
        return None
    assert last.is_file(), f"no checkpoint before the kill (exit {returncode}): {log.read_text()[-3000:]}"
    return torch.load(last, weights_only=True)["global_step"]


@pytest.mark.slow_for("var_test")  # subprocess runs; the gpt_test instance stays in the default suite
def test_resume_after_kill_continues_exactly(preset: str, pairs_dir: Path, tmp_path: Path) -> None:
    """A run killed after a checkpoint and resumed (resume=auto) exports exactly what an uninterrupted run exports.
    The tiny models train at ~10 ms a step, so a run may reach its last step (or exit) within the 0.3 s before the
    kill lands: then it is repeated 4x longer."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for max_steps in (24, 96):
        killed = tmp_path / f"killed{max_steps}"
        step = _kill_after_a_checkpoint(_cli(pairs_dir, killed, preset, max_steps=max_steps), killed, env)
        if step is not None and step < max_steps:
            break
    else:
        pytest.fail(f"every run reached its last step before the kill landed (last: step {step})")
    assert 6 <= step < max_steps, f"kill landed at step {step} of {max_steps}"
    assert not (killed / "export").exists()
    subprocess.run(_cli(pairs_dir, killed, preset, "resume=auto", max_steps=max_steps), cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    straight = tmp_path / f"straight{max_steps}"
    subprocess.run(_cli(pairs_dir, straight, preset, max_steps=max_steps), cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    a = _ema_and_raw(read_checkpoint(straight / "export" / "student_ema.pt"), preset)
    b = _ema_and_raw(read_checkpoint(killed / "export" / "student_ema.pt"), preset)
    for state_a, state_b in zip(a, b):
        assert set(state_a) == set(state_b)
        for name in state_a:
            torch.testing.assert_close(state_b[name], state_a[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.slow_for("var_test")  # subprocess runs; the gpt_test instance stays in the default suite
def test_ddp_two_cpu_ranks_trains(preset: str, pairs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(_cli(pairs_dir, out, preset, "trainer.devices=2", max_steps=6, val_every_steps=6),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _ema_and_raw(read_checkpoint(out / "export" / "student_ema.pt"), preset)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@GPT_ONLY
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
@GPT_ONLY
def test_compiled_student_trains(pairs_dir: Path, tmp_path: Path) -> None:
    """compile=true routes the loss through torch.compile (first compile costs ~30-60 s on CPU, hence slow)."""
    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, max_steps=3, val_every_steps=3,
                                                              ckpt_every=3, compile="true")))
    assert summary["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["metrics"].items() if k.startswith("train/"))


def test_resume_auto_refuses_a_checkpoint_of_other_settings_and_keeps_it(preset: str, pairs_dir: Path,
                                                                          tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """resume=auto over a run trained with another recipe (here another learning rate and batch size) is refused
    before anything is built, naming the changed settings and the fixes; the checkpoint and the saved settings stay as
    they were. The same recipe with a larger max_steps continues the run (extending it is allowed, and logged)."""
    out = tmp_path / "run"
    run_train(compose_cfg("train", _train_overrides(pairs_dir, out, model=preset, max_steps=4, ckpt_every=2,
                                                    val_every_steps=4)))
    last, saved = out / "checkpoints" / "last.ckpt", out / "config.json"
    before = (last.read_bytes(), saved.read_text())
    changed = _train_overrides(pairs_dir, out, model=preset, max_steps=4, ckpt_every=2, val_every_steps=4,
                               batch_size=8, **{"optim.lr": 1e-4})
    with pytest.raises(ConfigError) as refused:
        run_train(compose_cfg("train", changed))
    message = str(refused.value)
    assert "batch_size: before 16, now 8" in message and "optim.lr: before " in message and "now 0.0001" in message
    assert "resume=never" in message and "output_dir" in message
    assert (last.read_bytes(), saved.read_text()) == before
    with caplog.at_level("WARNING", logger="dd.train"):
        summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, out, model=preset, max_steps=6,
                                                                   ckpt_every=2, val_every_steps=3)))
    assert summary["global_step"] == 6
    assert any("max_steps=6 instead of the run's 4" in record.getMessage() for record in caplog.records)
    fresh = run_train(compose_cfg("train", changed + ["resume=never"]))  # the documented way to start over
    assert fresh["global_step"] == 4 and json.loads(saved.read_text())["batch_size"] == 8
    # the old run's checkpoints were set aside, so last.ckpt is the new run's (not a last-v1.ckpt beside the old one)
    assert sorted(p.name for p in last.parent.glob("*.ckpt")) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert torch.load(out / "checkpoints.previous" / "last.ckpt", weights_only=True)["global_step"] == 6
    extended = [o for o in changed if not o.startswith("max_steps=")] + ["max_steps=6"]
    assert run_train(compose_cfg("train", extended))["global_step"] == 6  # resume=auto continues the new run


def test_too_few_pairs_for_the_global_batch_is_a_config_error(preset: str, pairs_dir: Path, tmp_path: Path) -> None:
    """608 training pairs hold one batch of 400, not one of 400 on each of two ranks: refused before training."""
    with pytest.raises(ConfigError, match=r"608 training pairs for batch_size=400 on 2 rank\(s\)"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path / "run", model=preset, batch_size=400,
                                                        **{"trainer.devices": 2})))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("labels, num_classes", [("uniform", 10), ("balanced", 10), ("balanced", 4), ([3, 5, 7], 10)])
def test_validation_split_holds_out_one_in_every_and_every_class(labels, num_classes: int) -> None:
    """One pair in val_every is held out; with labels cycling over the sample id, every class is among them
    (every 20th id alone would hold out class 0 only for 10 balanced classes)."""
    from dd.pairs import make_labels
    from dd.train import validation_split

    held_out = validation_split(labels, num_classes, 20)
    ids = range(2400)  # whole multiples of every period
    val = [i for i in ids if held_out(i)]
    assert len(val) == 120
    if labels != "uniform":
        cycle = sorted(set(make_labels(list(ids), num_classes, labels, ids).tolist()))
        assert sorted(set(make_labels(val, num_classes, labels, val).tolist())) == cycle
    else:
        assert val == list(range(0, 2400, 20))  # the split every published number was trained with


def test_a_warm_up_as_long_as_the_run_is_reported(preset: str, pairs_dir: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="dd.train"):
        run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, model=preset, max_steps=3,
                                                        val_every_steps=3, **{"optim.warmup_steps": 4})))
    assert any("never reaches optim.lr" in r.getMessage() for r in caplog.records)


def test_perceptual_loss_trains_and_moves_its_frozen_tokenizer_with_the_task(preset: str, pairs_dir: Path,
                                                                             tmp_path: Path) -> None:
    """loss.perceptual_weight > 0: the term is computed and logged; the tokenizer it decodes through is a frozen
    submodule of the loss, so Lightning's move of the task to its device moves it too (it stayed behind as a plain
    attribute of the family) and no gradient accumulates in it."""
    from dd.distill.losses import FeaturePerceptualLoss
    from dd.distill.perceptual import load_perceptual_network

    summary = run_train(compose_cfg("train", _train_overrides(pairs_dir, tmp_path, model=preset, max_steps=3,
                                                              val_every_steps=3, **{"loss.perceptual_weight": 0.5})))
    assert summary["metrics"]["train/perceptual"] > 0
    family = build_spec(compose_cfg("train", [f"model={preset}"])).build_family()
    loss = FeaturePerceptualLoss(family, load_perceptual_network({"network": "fmnist_classifier"}))
    assert any(module is family.tokenizer for module in loss.modules())
    assert not any(p.requires_grad for p in family.tokenizer.parameters())
    loss.to(torch.float64)  # stands in for a device move
    assert all(p.dtype == torch.float64 for p in family.tokenizer.parameters())
