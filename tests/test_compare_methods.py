"""scripts/compare_methods.py: the points it plots are the runs' measured (seconds, 1-step FID) pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import compare_methods  # noqa: E402


def _metrics(folder: Path, fid: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"fid": fid}}))


def test_points_come_from_the_recorded_curve_with_the_pairs_time_added(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "pairs").mkdir(parents=True)
    curve = [{"step": 2, "train_s": 10.0, "metrics": {"DD 1-step": {"fid": 30.0}, "DD 2-step": {"fid": 31.0}}},
             {"step": 4, "train_s": 20.0, "metrics": {"DD 1-step": {"fid": 25.0}}}]
    (run / "results.json").write_text(json.dumps({"seconds": {"pairs_s": 5.0}, "curve": curve}))
    assert compare_methods.run_points(run) == [("2", 15.0, 30.0), ("4", 25.0, 25.0)]


def test_an_older_run_uses_its_final_row_for_the_final_snapshot_only(tmp_path: Path) -> None:
    """Snapshots without an evaluated curve folder are left out, except the final export's, whose FID is the run's
    own 1-step row (the older fallback gave every unevaluated snapshot the final FID)."""
    run = tmp_path / "old"
    snapshots = run / "train" / "export" / "snapshots"
    snapshots.mkdir(parents=True)
    for step, seconds in ((2, 10.0), (4, 20.0), (6, 30.0)):
        (snapshots / f"student_ema_step{step:07d}.pt.json").write_text(
            json.dumps({"global_step": step, "train_s": seconds}))
    (run / "train" / "export" / "student_ema.pt.json").write_text(json.dumps({"global_step": 6}))
    _metrics(run / "eval" / "curve" / "step2_1-step", 40.0)
    _metrics(run / "eval" / "dd_1-step", 22.0)
    assert compare_methods.run_points(run) == [("2", 10.0, 40.0), ("6", 30.0, 22.0)]
