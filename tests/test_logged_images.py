"""Images for loggers that show them (logger=wandb): training logs decoded sample grids of the teacher's pairs and the
1-step and t_list students at each validation (both families through the protocol), dd.eval logs its metrics and
grid.png. wandb runs with WANDB_MODE=offline: a local run folder, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dd.eval as dd_eval
from dd.distill.ema import EMA
from dd.generate_pairs import run as run_pairs
from dd.pairs import PairDataset, PairExpectation
from dd.tasks.loggers import numeric_entries
from dd.tasks.sample_grids import StudentSampleGrids, tile
from dd.train import run as run_train

from conftest import REPO_ROOT, export_teacher_initialised_student


def _cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["gpt_test", "var_test"])
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pairs_dir(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"pairs_{preset}")
    run_pairs(_cfg("generate_pairs", [f"model={preset}", "num_pairs=160", "shard_size=160", f"output_dir={out}"]))
    return out / "pairs"


def _offline_run(folder: Path) -> Path:
    runs = list(folder.rglob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline wandb run under {folder}, found {runs}"
    return runs[0]


def _logged_images(run: Path) -> list[str]:
    """Media paths (relative to the run's media/images folder) wandb stored for logged images."""
    media = run / "files" / "media" / "images"
    return sorted(str(p.relative_to(media)) for p in media.rglob("*.png"))


class _ImageRecorder:
    """A logger that shows images: records every log_image call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: Any) -> None:
        self.calls.append({"key": key, "images": images, "step": step, **kwargs})


class _FakeTrainer:
    def __init__(self, loggers: list) -> None:
        self.loggers, self.is_global_zero, self.sanity_checking, self.global_step = loggers, True, False, 7


def test_tile_lays_images_out_row_major() -> None:
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    grid = tile(images, per_row=2)
    assert grid.shape == (4, 4, 3) and grid[0, 0, 0] == 0 and grid[0, 2, 0] == 1 and grid[2, 0, 0] == 2
    assert grid[2, 2:].max() == 0  # the short last row stays black


def test_student_grids_through_the_protocol(preset: str, pairs_dir: Path) -> None:
    """Each family: the callback decodes the pairs' tokens and the 1-step / t_list samples of the EMA student and
    hands images of the decoded size to every image logger (and none when no logger shows images)."""
    cfg = _cfg("train", [f"model={preset}"])
    spec = instantiate(cfg["model"], _convert_="all")
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    expect = PairExpectation(family.sequence_length, family.token_dim, int(family.codebook().shape[0]),
                             family.num_classes)
    val = PairDataset(pairs_dir, expect, sample_filter=lambda i: i % 20 == 0)
    callback = StudentSampleGrids(family, val, spec.default_t_list, spec.default_split_t, num_images=5, per_row=4)
    module = torch.nn.Module()
    module.ema, module.device = EMA(student), torch.device("cpu")
    recorder = _ImageRecorder()
    callback.on_validation_end(_FakeTrainer([object(), recorder]), module)
    assert [c["key"] for c in recorder.calls] == ["samples/teacher", "samples/1step", "samples/2step"]
    size = spec.image_size
    labels = [int(val[i]["label"]) for i in range(5)]
    for call in recorder.calls:
        (image,) = call["images"]
        assert image.dtype == np.uint8 and image.shape == (2 * size, 4 * size, 3) and call["step"] == 7
        assert call["caption"] == [f"labels {' '.join(map(str, labels))}"]
    one_step, two_step = (recorder.calls[i]["images"][0] for i in (1, 2))
    assert not np.array_equal(one_step, two_step)  # the second step changes the images
    callback.grids = lambda *args: pytest.fail("sampled although no logger shows images")
    callback.on_validation_end(_FakeTrainer([object()]), module)  # e.g. logger=csv: nothing is sampled


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_training_with_wandb_logs_student_sample_grids(preset: str, pairs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {"model": preset, "data.pairs_dir": pairs_dir, "output_dir": out, "max_steps": 4,
                 "batch_size": 16, "val_every_steps": 2, "ckpt_every": 4, "log_every": 1, "optim.warmup_steps": 1,
                 "limit_val_batches": 1, "logger": "wandb", "sample_grid_images": 4}
    summary = run_train(_cfg("train", [f"{k}={v}" for k, v in overrides.items()]))
    assert summary["global_step"] == 4
    images = _logged_images(_offline_run(out))
    for key in ("samples/teacher", "samples/1step", "samples/2step"):
        assert len([p for p in images if p.startswith(key + "_")]) == 2, images  # one per validation run


def _student(tmp_path: Path) -> Path:
    return export_teacher_initialised_student("gpt_test", tmp_path / "student_ema.pt")


def test_eval_with_wandb_logs_metrics_and_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logged: dict[str, float] = {}
    original = WandbLogger.log_metrics

    def recording(self, metrics, step=None):  # still logs: wandb's writer stores the records asynchronously
        logged.update(metrics)
        return original(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", recording)
    out = tmp_path / "eval"
    payload = dd_eval.run(_cfg("eval", ["model=gpt_test", f"student.checkpoint={_student(tmp_path)}",
                                        f"output_dir={out}", "num_samples=8", "batch_size=8", "logger=wandb",
                                        "metrics.prc_reference=null", "metrics.label_accuracy=true"]))
    assert [p.split("_")[0] for p in _logged_images(_offline_run(out))] == ["eval/grid"]
    assert logged["eval/fid"] == payload["metrics"]["fid"] and logged["eval/steps"] == payload["steps"]
    assert logged["eval/label_accuracy"] == payload["metrics"]["label_accuracy"]
    assert logged["eval/timing/sampling_s_per_image"] == payload["timing"]["sampling_s_per_image"]


def test_eval_numbers_are_flattened_without_flags_or_text() -> None:
    flat = numeric_entries({"fid": 3.5, "ok": True, "name": "x", "none": None, "timing": {"s": 1}}, "eval")
    assert flat == {"eval/fid": 3.5, "eval/timing/s": 1.0}


def test_unknown_eval_logger_fails_before_loading(tmp_path: Path) -> None:
    cfg = _cfg("eval", ["model=gpt_test", "student.checkpoint=random:0", f"output_dir={tmp_path / 'out'}"])
    cfg["logger"] = {"name": "tensorboard"}
    with pytest.raises(dd_eval.ConfigError, match="logger='tensorboard'"):
        dd_eval.run(cfg)
    assert not (tmp_path / "out").exists()


def test_eval_keeps_its_results_when_wandb_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """wandb failing once its run started (no login or network fails before sampling, tests/test_cli_errors.py): the
    results are on disk already, so the run warns with the fix and succeeds."""
    import wandb.errors

    import dd.tasks.loggers as loggers

    def no_login(*args: Any, **kwargs: Any) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(loggers, "log_eval_results", no_login)
    out = tmp_path / "eval"
    payload = dd_eval.run(_cfg("eval", ["model=gpt_test", f"student.checkpoint={_student(tmp_path)}",
                                        f"output_dir={out}", "num_samples=4", "batch_size=4", "logger=wandb",
                                        "metrics.enabled=false"]))
    assert payload["num_samples"] == 4 and (out / "metrics.json").is_file()
    assert "results not logged: logger=wandb is unavailable (No API key configured" in caplog.text
    assert "WANDB_MODE=offline" in caplog.text
