"""The whole DD pipeline on the bundled tiny Fashion-MNIST teachers, on a CPU, in one command.

    python scripts/demo.py                       # both families (gpt_tiny, var_tiny); README: measured timings
    python scripts/demo.py --models var_tiny     # one family
    python scripts/demo.py --profile long        # more pairs and steps (README: <= 60 minutes on 2 cores)
    python scripts/demo.py --pairs 30000 --steps 6000 --out outputs/demo_custom    # explicit sizes win over a profile
    python scripts/demo.py --method dd2          # DD2 (conditional score distillation, no pairs): outputs/demo_dd2
    python scripts/demo.py --jobs 1              # families one after the other (default: one process per family,
                                                 # up to the CPU count, each with its share of the cores)

Per model: pairs -> training -> evaluation of the teacher, DD 1-step, DD 2-step and teacher-involved sampling with
the same labels and seeds. With curve points (``--curve-points N``; the long profile: 6) the EMA student is also
exported N times during training and each snapshot is evaluated at 1 and 2 steps: ``quality_curve.png`` (proxy FID
against training seconds, the teacher's as a line) and a table in the results. Ends with a metrics table per model (``<out>/<model>/results.md``, also printed) and one
grid comparing the samplers (``<out>/<model>/comparison.png``: one row per sampler, the same labels in every
column) and the training curves (``<out>/<model>/train/logs/curves.png``, linked from the results). Everything
the script does goes through the entry points' ``run`` functions: nothing here depends on the family.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

#: Sizes per profile and preset (docs/distillation_study.md; the recipe itself is configs/train.yaml's and the
#: presets' schedules and default_lr). A VAR-tiny step costs 2.3x a GPT-tiny step (130 tokens + the extra first
#: scale vs 64) and its held-out accuracy levels off earlier, so it gets fewer steps. default: <= 15 minutes for
#: both on a 2-core CPU (measured with one thread: README); long: <= 60 minutes.
PROFILES = {"default": {"gpt_tiny": {"pairs": 10000, "steps": 800, "batch": 64},
                        "var_tiny": {"pairs": 5000, "steps": 400, "batch": 64}},
            "long": {"gpt_tiny": {"pairs": 20000, "steps": 3000, "batch": 64},
                     "var_tiny": {"pairs": 20000, "steps": 1200, "batch": 64}}}
#: DD2 (--method dd2, no pairs): steps chosen so that training takes about the CPU time of the DD run of the same
#: profile end to end (pairs + training), the comparison the README makes. Batch 8: at equal CPU time many small
#: alternating updates beat few large ones (docs/dd2_study.md, rows O-U: batch 64 / 32 / 16 / 8 / 4)
DD2_PROFILES = {"default": {"gpt_tiny": {"pairs": 0, "steps": 3000, "batch": 8},
                            "var_tiny": {"pairs": 0, "steps": 1500, "batch": 8}},
                "long": {"gpt_tiny": {"pairs": 0, "steps": 16000, "batch": 8},
                         "var_tiny": {"pairs": 0, "steps": 5000, "batch": 8}}}
FALLBACK_SIZES = {"pairs": 10000, "steps": 800, "batch": 64}  # presets without a profile entry
#: points of the quality-against-training-time curve per profile (EMA snapshots evaluated at 1 and 2 steps)
CURVE_POINTS = {"default": 0, "long": 6}


def _sizes(args: argparse.Namespace, model: str) -> argparse.Namespace:
    """The profile's sizes for ``model``; --pairs / --steps / --batch given on the command line win."""
    profiles = DD2_PROFILES if getattr(args, "method", "dd") == "dd2" else PROFILES
    sizes = profiles[args.profile].get(model, FALLBACK_SIZES)
    return argparse.Namespace(**{key: getattr(args, key) if getattr(args, key) is not None else value
                                 for key, value in sizes.items()})


def _cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


def _evaluate(model: str, out: Path, export: Path, name: str, samples: int, extra: list[str]) -> dict:
    from dd.eval import run as run_eval

    # resume=never: a re-run of the demo trains a new student, whose samples must replace the old ones
    overrides = [f"model={model}", "resume=never", f"num_samples={samples}", "labels=balanced", "seed_base=100000",
                 f"student.checkpoint={export}", f"output_dir={out / 'eval' / name}", *extra]
    return run_eval(_cfg("eval", overrides))


def _row(name: str, payload: dict) -> str:
    m, timing = payload["metrics"], payload["timing"]

    def fmt(value: object, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    return (f"| {name} | {payload['steps']} | {fmt(m.get('fid'), 2)} | {fmt(m.get('isc_mean'), 2)} | "
            f"{fmt(m.get('precision'))} | {fmt(m.get('recall'))} | {fmt(m.get('label_accuracy'))} | "
            f"{1000 * timing['sampling_s_per_image']:.2f} |")


def _comparison(out: Path, runs: list[tuple[str, str]], per_row: int = 20) -> Path:
    """One row per sampler (display name, eval folder), the first ``per_row`` samples (same sample ids, hence the
    same labels) in each."""
    rows = []
    for name, folder in runs:
        with np.load(out / "eval" / folder / "samples.npz") as data:
            rows.append((name, data["arr_0"][:per_row], data["labels"][:per_row]))
    h, w = rows[0][1].shape[1:3]
    margin = 120
    canvas = Image.new("RGB", (margin + per_row * w, len(rows) * h + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(rows[0][2]):
        draw.text((margin + c * w + w // 3, 0), str(int(label)), fill="black")
    for r, (name, images, labels) in enumerate(rows):
        assert np.array_equal(labels, rows[0][2]), "samplers must use the same labels"
        draw.text((3, 14 + r * h + h // 3), name, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (margin + c * w, 14 + r * h))
    path = out / "comparison.png"
    canvas.save(path)
    return path


def _teacher_start(model: str, requested: int | None) -> int:
    """Default: a third of the second timestep (gpt_tiny: 16 of t_list [0, 48]; var_tiny: 1 of [0, 4] scales)."""
    if requested is not None:
        return requested
    second = _cfg("eval", [f"model={model}"])["schedule"]["t_list"][1]
    return max(0, round(second / 3))


def _curve_points(args: argparse.Namespace) -> int:
    return args.curve_points if args.curve_points is not None else CURVE_POINTS[args.profile]


def _student_runs(method: str, export: Path) -> dict[str, list[str]]:
    """The student rows of a method: DD at 1 and 2 steps; DD2 (a one-step generator) at 1 step, every token from
    the head it was trained on (the schedule its export records)."""
    if method == "dd2":
        schedule = json.loads(Path(str(export) + ".json").read_text())["schedule"]
        return {"DD2 1-step": ["sampler=fewstep", "schedule.t_list=[0]", f"schedule.split_t={schedule['split_t']}"]}
    return {"DD 1-step": ["sampler=fewstep", "schedule=onestep"], "DD 2-step": ["sampler=fewstep"]}


def _quality_curve(model: str, out: Path, export: Path, args: argparse.Namespace, teacher_fid: float | None,
                   final: dict[str, dict], final_step: int, teacher_steps: int) -> tuple[str, list[dict]]:
    """Evaluate every training snapshot with the method's student rows (the final one is the run's own rows); the
    curve PNG, a markdown table and the rows."""
    from dd.tasks.curves import plot_lines
    from dd.tasks.snapshots import list_snapshots

    rows = []
    names = list(_student_runs(args.method, export))
    for snapshot in list_snapshots(export.parent):
        info = json.loads(Path(str(snapshot) + ".json").read_text())
        step = int(info["global_step"])
        metrics = {}
        for name, extra in _student_runs(args.method, snapshot).items():
            if step == final_step and name in final:
                metrics[name] = final[name]["metrics"]  # the last snapshot is the final export: already evaluated
            else:
                folder = f"curve/step{step}_{name.split(' ')[-1]}"
                metrics[name] = _evaluate(model, out, snapshot, folder, args.samples, extra)["metrics"]
        rows.append({"step": step, "train_s": float(info["train_s"]), "metrics": metrics})
    lines = {n: [(r["train_s"], r["metrics"][n]["fid"]) for r in rows if r["metrics"][n].get("fid") is not None]
             for n in names}
    if teacher_fid is not None and rows:
        lines[f"teacher ({teacher_steps} steps)"] = [(rows[0]["train_s"], teacher_fid), (rows[-1]["train_s"], teacher_fid)]
    plot_lines(lines, out / "quality_curve.png", f"{model}: proxy FID of EMA snapshots", "training seconds")
    table = ["| step | training s | " + " | ".join(f"{n} FID | {n} recall" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for r in rows:
        cells = " | ".join(f"{r['metrics'][n].get('fid', float('nan')):.2f} | {r['metrics'][n].get('recall', float('nan')):.3f}"
                           for n in names)
        table.append(f"| {r['step']} | {r['train_s']:.0f} | {cells} |")
    return "\n".join(table), rows


def run_model(model: str, args: argparse.Namespace, out: Path) -> str:
    """pairs -> training -> evaluation of one preset; returns its results table and timing as markdown."""
    from dd.generate_pairs import run as run_pairs
    from dd.train import run as run_train

    size = _sizes(args, model)
    points = _curve_points(args)
    snapshot = [f"snapshot_every={max(size.steps // points, 1)}"] if points > 0 else []
    clock = {"start": time.perf_counter()}
    if args.method == "dd":  # DD2 needs no pairs
        run_pairs(_cfg("generate_pairs", [f"model={model}", f"num_pairs={size.pairs}", f"output_dir={out / 'pairs'}"]))
    clock["pairs"] = time.perf_counter()
    summary = run_train(_cfg("train", [f"model={model}", f"method={args.method}",
                                       f"data.pairs_dir={out / 'pairs' / 'pairs'}",
                                       f"output_dir={out / 'train'}", f"max_steps={size.steps}",
                                       f"batch_size={size.batch}", f"val_every_steps={max(size.steps // 4, 1)}",
                                       f"ckpt_every={max(size.steps // 2, 1)}", *snapshot, *args.train_overrides]))
    clock["train"] = time.perf_counter()
    export = Path(summary["export"])
    runs = {"teacher": ["sampler=teacher"], **_student_runs(args.method, export)}
    if args.method == "dd":
        start = _teacher_start(model, args.teacher_start)
        runs[f"teacher-involved s={start}"] = ["sampler=teacher_involved", f"teacher_start_t={start}"]
    results = {}
    for name, extra in runs.items():
        folder = name.split(" ")[0].lower() + "_" + name.split(" ")[-1].replace("=", "")
        results[name] = (folder, _evaluate(model, out, export, folder, args.samples, extra))
    clock["eval"] = time.perf_counter()
    curve, curve_rows = "", []
    if points > 0:
        teacher_fid = results["teacher"][1]["metrics"].get("fid")
        curve_table, curve_rows = _quality_curve(model, out, export, args, teacher_fid, {n: p for n, (_, p) in results.items()},
                                     size.steps, results["teacher"][1]["steps"])
        clock["curve"] = time.perf_counter()
        curve = (f"quality against training time (EMA snapshots; {clock['curve'] - clock['eval']:.0f} s to "
                 f"evaluate): ![](quality_curve.png)\n\n{curve_table}\n\n")
    lines = ["| sampler | #Step | FID (classifier features) | IS | precision | recall | label accuracy | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, payload) for name, (_, payload) in results.items()]
    pairs = f"pairs {clock['pairs'] - clock['start']:.0f} s ({size.pairs} pairs)" if args.method == "dd" else "no pairs"
    timing = (f"method {args.method}, profile {args.profile}: {pairs}, training "
              f"{clock['train'] - clock['pairs']:.0f} s ({size.steps} steps of {size.batch}), evaluation "
              f"{clock['eval'] - clock['train']:.0f} s ({args.samples} samples per sampler); total "
              f"{clock['eval'] - clock['start']:.0f} s")
    table = "\n".join(lines)
    curves = "training curves (loss terms, held-out token accuracy per t): ![](train/logs/curves.png)"
    (out / "results.md").write_text(table + "\n\n" + timing + "\n\n" + curve + curves + "\n\n![](comparison.png)\n")
    seconds = {"pairs_s": clock["pairs"] - clock["start"], "train_s": clock["train"] - clock["pairs"],
               "eval_s": clock["eval"] - clock["train"]}
    (out / "results.json").write_text(json.dumps({**{n: p for n, (_, p) in results.items()}, "method": args.method,
                                                  "seconds": seconds, "curve": curve_rows}, indent=2, default=str))
    grid = _comparison(out, [(name, folder) for name, (folder, _) in results.items()])
    return (f"### {model}\n\n{table}\n\n{timing}\n\n{curve}comparison grid: {grid}\n\n"
            f"training curves: {out / 'train' / 'logs' / 'curves.png'}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt_tiny,var_tiny", help="comma-separated presets (bundled teachers)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default",
                        help="sizes per preset (PROFILES): default (gpt_tiny 10k pairs, 800 steps of 64; var_tiny "
                             "5k, 400) or long (gpt_tiny 20k, 3000; var_tiny 20k, 1200)")
    parser.add_argument("--pairs", type=int, default=None, help="number of pairs (default: the profile's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the profile's)")
    parser.add_argument("--train-override", dest="train_overrides", action="append", default=[],
                        help="extra dd.train override, repeatable (e.g. --train-override optim.lr=1e-3)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--method", choices=("dd", "dd2"), default="dd",
                        help="dd: pairs + pair regression (1-step, 2-step, teacher-involved rows); dd2: conditional "
                             "score distillation, no pairs (1-step row); sizes from the profile (DD2_PROFILES)")
    parser.add_argument("--curve-points", type=int, default=None,
                        help="EMA snapshots evaluated at 1 and 2 steps for quality_curve.png (default: the profile's: "
                             "default 0, long 6)")
    parser.add_argument("--teacher-start", type=int, default=None,
                        help="teacher_start_t of the teacher-involved row (default: a third of t_list[1])")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/demo, outputs/demo_long)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per family (0: torch's default with --jobs 1, else the CPU count "
                             "divided by the jobs)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="families run at once, one process each (0: min(families, CPU count); 1: one after "
                             "the other in this process). Results are the same either way (every draw is seeded "
                             "per sample)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one family of a --jobs run
    args = parser.parse_args()
    suffix = "" if args.method == "dd" else f"_{args.method}"
    args.out = args.out or (f"outputs/demo{suffix}" if args.profile == "default" else f"outputs/demo{suffix}_{args.profile}")
    out = Path(args.out)
    models = [model.strip() for model in args.models.split(",") if model.strip()]
    cpus = os.cpu_count() or 1
    jobs = min(len(models), args.jobs or cpus)
    if jobs < 1:
        raise SystemExit(f"--jobs={args.jobs} must be >= 0")
    start = time.perf_counter()
    if jobs > 1:
        reports = _run_parallel(models, args, jobs, args.threads or max(1, cpus // jobs))
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        reports = [run_model(model, args, out / model) for model in models]
    if args.worker:  # the parent gathers the report and writes the summary
        (out / models[0] / "report.md").write_text(reports[0])
        return
    wall = time.perf_counter() - start
    summary = "\n".join(reports) + (f"\nwall time for {len(models)} families with {jobs} job(s): {wall:.0f} s\n")
    (out / "results.md").write_text(summary)
    print(summary)


def _worker_command(model: str, args: argparse.Namespace, threads: int) -> list[str]:
    """This script's command line for one family of a parallel run (every size and setting passed on)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--jobs", "1", "--models", model,
               "--profile", args.profile, "--samples", str(args.samples), "--method", args.method,
               "--out", str(args.out), "--threads", str(threads)]
    for flag, value in (("--pairs", args.pairs), ("--steps", args.steps), ("--batch", args.batch),
                        ("--curve-points", args.curve_points), ("--teacher-start", args.teacher_start)):
        if value is not None:
            command += [flag, str(value)]
    for override in args.train_overrides:
        command += ["--train-override", override]
    return command


PROGRESS_EVERY_S = 30


def _last_line(log: Path) -> str:
    """The newest progress line of a child's log (progress bars rewrite their line with carriage returns)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "starting"
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1][:160] if lines else "starting"


def _run_parallel(models: list[str], args: argparse.Namespace, jobs: int, threads: int) -> list[str]:
    """One process per family, ``jobs`` at a time, ``threads`` torch threads each; their progress bars share the
    terminal and each also logs to ``<out>/<model>/demo.log``. Returns the reports in ``models`` order."""
    print(f"running {', '.join(models)} in {jobs} parallel processes ({threads} torch thread(s) each); logs: "
          + ", ".join(str(Path(args.out) / m / "demo.log") for m in models), flush=True)

    def one(model: str) -> str:
        folder = Path(args.out) / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").unlink(missing_ok=True)
        with open(folder / "demo.log", "w") as log:
            done = subprocess.run(_worker_command(model, args, threads), stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not (folder / "report.md").is_file():
            tail = "".join((folder / "demo.log").read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"the {model} demo failed (exit {done.returncode}); its log is {folder / 'demo.log'}:\n"
                               f"{tail}")
        print(f"{model}: done", flush=True)
        return (folder / "report.md").read_text()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, model) for model in models]
        next_report = time.perf_counter() + PROGRESS_EVERY_S
        while not all(f.done() for f in futures):  # progress: every family's latest log line, now and then
            time.sleep(0.5)
            if time.perf_counter() >= next_report:
                next_report += PROGRESS_EVERY_S
                for model, future in zip(models, futures):
                    if not future.done():
                        print(f"[{model}] {_last_line(Path(args.out) / model / 'demo.log')}", flush=True)
        failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        raise SystemExit("\n\n".join(str(err) for err in failures))
    return [f.result() for f in futures]


if __name__ == "__main__":
    main()
