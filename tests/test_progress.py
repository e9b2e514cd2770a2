"""Progress output: a bar on a terminal, periodic one-line summaries (rate, ETA) when the output is a file or a pipe."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from tqdm import tqdm

from dd.generate_pairs import run as run_pairs
from dd.progress import LineProgress, progress_bar
from dd.tasks.progress import LineProgressBar, training_progress_callbacks
from dd.train import run as run_train

from test_pairs import compose_cfg


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_at_each_tenth_and_after_each_interval_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(1000, "pairs", "pair", stream=out, interval_s=20.0, clock=clock)
    for _ in range(99):  # 99 pairs in 12.4 s: below a tenth and below the interval, so nothing yet
        clock.now += 0.125
        bar.update(1)
    assert out.getvalue() == ""
    clock.now += 0.125
    bar.update(1)  # 100 = a tenth
    assert out.getvalue() == "pairs: 100/1000 pair (10%), 8.0 pair/s, elapsed 00:12, ETA 01:52\n"
    clock.now += 25.0
    bar.update(5)  # 25 s later, only 0.5% more: the interval makes a line
    assert out.getvalue().splitlines()[-1] == "pairs: 105/1000 pair (10%), 2.8 pair/s, elapsed 00:37, ETA 05:19"
    bar.close()  # nothing new since the last line
    assert len(out.getvalue().splitlines()) == 2


def test_many_small_updates_give_about_ten_lines_and_a_final_one() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(10_000, "sampling", "img", stream=out, clock=clock)
    for _ in range(9_999):
        clock.now += 0.0005
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[-1].startswith("sampling: 9999/10000 img (100%)") and "ETA" in lines[-1]
    assert all(re.search(r"\d+\.\d img/s, elapsed \d\d:\d\d", line) for line in lines)


def test_slow_items_read_as_seconds_per_item_and_resumed_counts() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(100, "train", "step", stream=out, clock=clock, initial=40)
    clock.now = 30.0
    bar.postfix = "train/loss 2.5"
    bar.update(10)  # 10 steps of this run in 30 s
    assert out.getvalue() == "train: 50/100 step (50%), 3.00 s/step, elapsed 00:30, ETA 02:30, train/loss 2.5\n"


def test_bar_on_a_terminal_lines_otherwise() -> None:
    terminal = FakeTerminal()
    bar = progress_bar(10, "pairs", "pair", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, "pairs", "pair", stream=io.StringIO()), LineProgress)
    assert training_progress_callbacks({}, stream=terminal) == []  # Lightning keeps its own bar
    assert training_progress_callbacks({"enable_progress_bar": False}, stream=io.StringIO()) == []
    assert isinstance(training_progress_callbacks({}, stream=io.StringIO())[0], LineProgressBar)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=320", "shard_size=32",
                                             f"output_dir={out}"]))
    return out / "pairs"


def test_jobs_write_summary_lines_not_bar_redraws_when_not_on_a_terminal(
        pairs_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=320", "shard_size=32",
                                             f"output_dir={tmp_path / 'gen'}"]))
    run_train(compose_cfg("train", [
        "model=gpt_test", f"data.pairs_dir={pairs_dir}", f"output_dir={tmp_path / 'train'}", "max_steps=40",
        "batch_size=8", "val_every_steps=20", "ckpt_every=40", "limit_val_batches=1", "logger=none"]))
    err = capfd.readouterr().err
    assert "\r" not in err, "no carriage-return redraws in a log"
    pair_lines = [line for line in err.splitlines() if line.startswith("pairs (rank 0 of 1): ")]
    assert len(pair_lines) == 10 and pair_lines[-1].startswith("pairs (rank 0 of 1): 320/320 pair (100%)")
    train_lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert 10 <= len(train_lines) <= 12, train_lines
    assert train_lines[-1].startswith("train: 40/40 step (100%)") and "train/loss" in train_lines[-1]
    assert any(line.startswith("validation at step 20: val/") for line in err.splitlines())
