"""One plot of one-step proxy FID against CPU wall time for several demo runs (e.g. DD and DD2 on one teacher).

    python scripts/compare_methods.py --run DD=outputs/demo_long/gpt_tiny --run DD2=outputs/demo_dd2_long/gpt_tiny \
        --out docs/img/gpt_tiny_dd_vs_dd2.png

Each run is a ``scripts/demo.py`` model folder trained with curve points (``--curve-points N``; the long profile has
them). A point is one EMA snapshot: x = the run's pair-generation seconds (DD; DD2 needs no pairs) + the training
seconds up to the snapshot, y = its 1-step proxy FID (``eval/curve/step<N>_1-step``, the last snapshot from the run's
own 1-step row). The teacher's FID is drawn as a line. Prints the points as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dd.tasks.curves import plot_lines  # noqa: E402


def _fid(folder: Path) -> float | None:
    path = folder / "metrics.json"
    return json.loads(path.read_text())["metrics"].get("fid") if path.is_file() else None


def _pairs_seconds(run: Path) -> float:
    results = run / "results.json"
    if results.is_file():
        seconds = json.loads(results.read_text()).get("seconds")
        if seconds:
            return float(seconds["pairs_s"]) if (run / "pairs").is_dir() else 0.0
    match = re.search(r"pairs (\d+) s", (run / "results.md").read_text()) if (run / "results.md").is_file() else None
    return float(match.group(1)) if match else 0.0


def _curve_rows(run: Path) -> list[dict]:
    results = run / "results.json"
    return json.loads(results.read_text()).get("curve") or [] if results.is_file() else []


def run_points(run: Path) -> list[tuple[str, float, float]]:
    """(step, pairs + training seconds, 1-step FID) per snapshot of a demo model folder: the curve its results.json
    records (a --method dd+dd2 run's DD snapshots, then its DD2 ones, seconds counted from the start of DD), or for
    runs made before the demo recorded it, its snapshots and their evaluation folders."""
    pairs_s = _pairs_seconds(run)
    points = []
    for row in _curve_rows(run):
        one_step = [m for name, m in row["metrics"].items() if name.endswith("1-step") and m.get("fid") is not None]
        if one_step:
            step = f"{row['phase']} {row['step']}" if "phase" in row else str(row["step"])
            points.append((step, pairs_s + float(row["train_s"]), float(one_step[0]["fid"])))
    if points:
        return points
    final = [f for f in sorted((run / "eval").glob("dd*_1-step")) if f.is_dir()]
    export = run / "train" / "export" / "student_ema.pt.json"
    last_step = int(json.loads(export.read_text())["global_step"]) if export.is_file() else None
    points = []
    for sidecar in sorted((run / "train" / "export" / "snapshots").glob("student_ema_step*.pt.json")):
        info = json.loads(sidecar.read_text())
        step = int(info["global_step"])
        fid = _fid(run / "eval" / "curve" / f"step{step}_1-step")
        if fid is None and final and len(final) == 1 and step == last_step:
            fid = _fid(final[0])  # the final export's snapshot, evaluated as the run's own 1-step row
        if fid is not None:
            points.append((str(step), pairs_s + float(info["train_s"]), float(fid)))
    if not points:
        raise SystemExit(f"{run}: no evaluated snapshots (run scripts/demo.py with --curve-points)")
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="LABEL=path/to/demo/<model> (repeatable)")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--title", default="1-step proxy FID against CPU seconds (pairs + training)")
    args = parser.parse_args()
    lines, table, teacher = {}, ["| run | step | seconds | 1-step FID |", "|---|---|---|---|"], None
    for spec in args.run:
        label, _, path = spec.partition("=")
        run = Path(path)
        points = run_points(run)
        lines[label] = [(x, y) for _, x, y in points]
        table += [f"| {label} | {step} | {x:.0f} | {y:.2f} |" for step, x, y in points]
        teacher = teacher if teacher is not None else _fid(run / "eval" / "teacher_teacher")
    if teacher is not None:
        xs = [x for values in lines.values() for x, _ in values]
        lines["teacher"] = [(min(xs), teacher), (max(xs), teacher)]
    print(f"wrote {plot_lines(lines, args.out, args.title, 'CPU seconds (pairs + training)')}")
    print("\n".join(table))


if __name__ == "__main__":
    main()
