"""Training curves (dd.tasks.curves): the PNG is drawn from logged values, and a training run writes it next to its
CSV log (``<output_dir>/logs/curves.png``), or into the run folder without a CSV logger. Also ``loss.t_probs``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.distill.losses import LossConfig, sample_timesteps
from dd.generate_pairs import run as run_pairs
from dd.runs import ConfigError
from dd.tasks.curves import CURVES_FILE, plot_curves, read_metrics_csv, series
from dd.train import run as run_train

from test_pairs import compose_cfg


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs_curves")
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=160", "shard_size=80",
                                             f"output_dir={out}"]))
    return out / "pairs"


def _train(pairs: Path, out: Path, *extra: str) -> dict:
    overrides = ["model=gpt_test", f"data.pairs_dir={pairs}", f"output_dir={out}", "max_steps=8", "batch_size=16",
                 "val_every_steps=4", "ckpt_every=8", "log_every=1", "optim.warmup_steps=2", "limit_val_batches=1",
                 *extra]
    return run_train(compose_cfg("train", overrides))


def _is_drawn(path: Path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return pixels.shape[0] > 100 and pixels.shape[1] > 300 and (pixels < 250).any(axis=-1).mean() > 0.01


def test_plot_curves_from_rows(tmp_path: Path) -> None:
    rows = [{"step": float(s), "train/loss": 5.0 - s / 10, "train/ce": 4.0 - s / 10, "train/mse": 0.1,
             "train/perceptual": 0.0, "train/token_acc": s / 100} for s in range(1, 40)]
    rows += [{"step": 20.0, "val/token_acc_t0": 0.2, "val/token_acc_t8": 0.4, "val/sample_token_acc_1step": 0.2},
             {"step": 39.0, "val/token_acc_t0": 0.3, "val/token_acc_t8": 0.5, "val/sample_token_acc_1step": 0.3}]
    path = plot_curves(rows, tmp_path / "sub" / "curves.png", title="synthetic")
    assert path.is_file() and _is_drawn(path)
    assert series(rows, "val/token_acc_t8") == [(20.0, 0.4), (39.0, 0.5)]
    assert plot_curves([], tmp_path / "empty.png").is_file()  # no data yet: empty panels, no error


def test_training_writes_curves_next_to_csv_log(pairs_dir: Path, tmp_path: Path) -> None:
    _train(pairs_dir, tmp_path / "run")
    logs = tmp_path / "run" / "logs"
    assert (logs / "metrics.csv").is_file() and (logs / CURVES_FILE).is_file()
    assert _is_drawn(logs / CURVES_FILE)
    rows = read_metrics_csv(logs / "metrics.csv")
    assert [step for step, _ in series(rows, "val/token_acc_t0")] == [3.0, 7.0]  # validations after steps 4, 8
    assert len(series(rows, "train/loss")) >= 7


def test_training_without_csv_logger_writes_curves_to_run_folder(pairs_dir: Path, tmp_path: Path) -> None:
    _train(pairs_dir, tmp_path / "run", "logger=none")
    assert _is_drawn(tmp_path / "run" / CURVES_FILE)


def test_t_probs_weights_the_timesteps(pairs_dir: Path, tmp_path: Path) -> None:
    counts = torch.bincount(sample_timesteps([0, 8], 4000, torch.Generator().manual_seed(0), probs=[3, 1]))
    assert abs(counts[0].item() / 4000 - 0.75) < 0.03
    with pytest.raises(ValueError, match="one weight per t"):
        sample_timesteps([0, 8], 4, probs=[1.0])
    with pytest.raises(ValueError, match="positive sum"):
        LossConfig(t_probs=[0.0, 0.0])
    with pytest.raises(ConfigError, match="t_probs"):
        _train(pairs_dir, tmp_path / "bad", "loss.t_probs=[1,2,3]")


def test_training_draws_timesteps_with_the_t0_weight(pairs_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import dd.tasks.distillation as distillation

    seen: list[tuple] = []

    def recording(t_list, batch, generator=None, probs=None):
        seen.append((tuple(t_list), probs))
        return sample_timesteps(t_list, batch, generator, probs)

    monkeypatch.setattr(distillation, "sample_timesteps", recording)
    _train(pairs_dir, tmp_path / "run", "schedule.t_list=[0,4,8]", "loss.t0_weight=2.5", "val_every_steps=8")
    assert len(seen) == 8 and set(seen) == {((0, 4, 8), (2.5, 1.0, 1.0))}


def test_t0_weight_adapts_to_the_t_list_and_yields_to_t_probs() -> None:
    """``loss.t0_weight`` weights t = 0 against 1 for every other t of whatever t_list the run uses; explicit
    ``t_probs`` win; a weight of 1 is the uniform draw; gpt_tiny's preset sets 6, the other presets leave it at 1."""
    config = LossConfig(t0_weight=3)
    assert config.timestep_weights([0, 48]) == (3.0, 1.0)
    assert config.timestep_weights([0, 24, 48]) == (3.0, 1.0, 1.0)
    assert config.timestep_weights([8]) is None  # no t = 0 in the list: nothing to weight
    assert LossConfig().timestep_weights([0, 48]) is None
    assert LossConfig(t0_weight=3, t_probs=[1, 0]).timestep_weights([0, 48]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="one weight per t"):
        LossConfig(t0_weight=3, t_probs=[1, 0]).timestep_weights([0, 24, 48])
    for bad in (0, -1.0, float("nan"), None, "three"):
        with pytest.raises(ValueError, match="t0_weight"):
            LossConfig(t0_weight=bad)
    weights = LossConfig(t0_weight=3).timestep_weights([0, 48])
    counts = torch.bincount(sample_timesteps([0, 48], 4000, torch.Generator().manual_seed(1), probs=weights) // 48)
    assert abs(counts[0].item() / 4000 - 0.75) < 0.03
    assert compose_cfg("train", ["model=gpt_tiny"])["loss"]["t0_weight"] == 6.0
    assert compose_cfg("train", ["model=var_tiny"])["loss"]["t0_weight"] == 1.0
    assert compose_cfg("train", ["model=gpt_tiny", "loss.t0_weight=1"])["loss"]["t0_weight"] == 1.0


def test_a_bad_t0_weight_is_a_config_error_naming_it(pairs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"t0_weight=0 must be a number > 0"):
        _train(pairs_dir, tmp_path / "bad", "loss.t0_weight=0")
    assert not (tmp_path / "bad" / "checkpoints").exists()
