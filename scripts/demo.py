"""The whole DD pipeline on the bundled tiny Fashion-MNIST teachers, on a CPU, in one command.

    python scripts/demo.py                       # both families (gpt_tiny, var_tiny); README: measured timings
    python scripts/demo.py --models var_tiny     # one family
    python scripts/demo.py --profile long        # more pairs and steps (README: <= 60 minutes on 2 cores)
    python scripts/demo.py --pairs 30000 --steps 6000 --out outputs/demo_custom    # explicit sizes win over a profile
    python scripts/demo.py --method dd2          # DD2 (conditional score distillation, no pairs): outputs/demo_dd2
    python scripts/demo.py --method dd+dd2       # DD, then DD2 fine-tunes its student: outputs/demo_dd_dd2
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
#: DD then DD2 (--method dd+dd2): DD's pairs and a DD run of ``steps``, then ``dd2_steps`` DD2 steps of ``dd2_batch``
#: fine-tuning its EMA student (DD2_FINETUNE). var_tiny: DD 300 + DD2 100 steps take ~90% of the CPU time of the DD
#: demo's 400 DD steps and reach 16.42 / 16.60 / 17.05 / 18.03 / 17.92 / 16.96 in six runs, mean 1.55x the teacher
#: (DD: 21.62 / 21.65); most of DD2's gain is in its first 100 steps (docs/dd2_study.md, eleventh session).
#: gpt_tiny: DD2 fine-tuning first dips on this teacher (a short one loses to DD at equal time), so its profile keeps
#: DD's whole run and adds 2000 DD2 steps (~350 s more): FID kept (13.80 -> 13.22), recall 0.223 -> 0.334 (tenth
#: session). Long: var_tiny DD 1100 + DD2 100 steps reach 14.79 where DD's long profile (1200 steps) reaches 17.20
#: (README); gpt_tiny's long entry follows the same rule and was not measured.
DD_DD2_PROFILES = {"default": {"gpt_tiny": {"pairs": 10000, "steps": 800, "batch": 64, "dd2_steps": 2000, "dd2_batch": 8},
                               "var_tiny": {"pairs": 5000, "steps": 300, "batch": 64, "dd2_steps": 100, "dd2_batch": 8}},
                   "long": {"gpt_tiny": {"pairs": 20000, "steps": 3000, "batch": 64, "dd2_steps": 2000, "dd2_batch": 8},
                            "var_tiny": {"pairs": 20000, "steps": 1100, "batch": 64, "dd2_steps": 100, "dd2_batch": 8}}}
#: the DD2 fine-tuning of a DD student (README "DD2"): the guidance network starts as the teacher's denoiser (no GTS),
#: the training codes are drawn from the student's softmax
DD2_FINETUNE = ["method=dd2", "method.guidance=residual", "method.gts_steps=0", "method.code_draw=gumbel"]
FALLBACK_SIZES = {"pairs": 10000, "steps": 800, "batch": 64}  # presets without a profile entry
FALLBACK_DD2_SIZES = {"dd2_steps": 300, "dd2_batch": 8}  # --method dd+dd2 on presets without a profile entry
#: points of the quality-against-training-time curve per profile (EMA snapshots evaluated at 1 and 2 steps)
CURVE_POINTS = {"default": 0, "long": 6}


def _sizes(args: argparse.Namespace, model: str) -> argparse.Namespace:
    """The profile's sizes for ``model``; --pairs / --steps / --batch given on the command line win."""
    method = getattr(args, "method", "dd")
    profiles = {"dd2": DD2_PROFILES, "dd+dd2": DD_DD2_PROFILES}.get(method, PROFILES)
    fallback = {**FALLBACK_SIZES, **FALLBACK_DD2_SIZES} if method == "dd+dd2" else FALLBACK_SIZES
    sizes = profiles[args.profile].get(model, fallback)
    return argparse.Namespace(**{key: getattr(args, key, None) if getattr(args, key, None) is not None else value
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
    """The student rows of one trained export: DD at 1 and 2 steps; a DD2 generator (``method`` dd2, or the DD2
    phase of dd+dd2) at 1 step, every token from the head it was trained on (the schedule its export records)."""
    if method in ("dd2", "dd+dd2"):
        schedule = json.loads(Path(str(export) + ".json").read_text())["schedule"]
        name = "DD2 1-step" if method == "dd2" else "DD+DD2 1-step"
        return {name: ["sampler=fewstep", "schedule.t_list=[0]", f"schedule.split_t={schedule['split_t']}"]}
    return {"DD 1-step": ["sampler=fewstep", "schedule=onestep"], "DD 2-step": ["sampler=fewstep"]}


def _phases(method: str, exports: list[Path], offsets: list[float]) -> list[dict]:
    """The trained phases of a run, in order: their export, training seconds before them, student rows and the
    folder prefix of their curve evaluations (dd+dd2: the DD student at 1 step, then the DD2 fine-tuning)."""
    if method == "dd+dd2":
        dd = {"DD 1-step": _student_runs("dd", exports[0])["DD 1-step"]}
        return [{"export": exports[0], "offset_s": offsets[0], "runs": dd, "prefix": ""},
                {"export": exports[1], "offset_s": offsets[1], "runs": _student_runs(method, exports[1]),
                 "prefix": "dd2_"}]
    return [{"export": exports[0], "offset_s": offsets[0], "runs": _student_runs(method, exports[0]), "prefix": ""}]


def _quality_curve(model: str, out: Path, phases: list[dict], args: argparse.Namespace, teacher_fid: float | None,
                   final: dict[str, dict], teacher_steps: int) -> tuple[str, list[dict]]:
    """Evaluate every training snapshot of every phase with that phase's student rows (a phase's last snapshot is
    its final export, already evaluated in ``final``); the curve PNG, a markdown table and the rows. A row's
    ``train_s`` counts the training seconds of the phases before it."""
    from dd.tasks.curves import plot_lines
    from dd.tasks.snapshots import list_snapshots

    rows = []
    names = [name for phase in phases for name in phase["runs"]]
    for phase in phases:
        final_step = int(json.loads(Path(str(phase["export"]) + ".json").read_text())["global_step"])
        for snapshot in list_snapshots(phase["export"].parent):
            info = json.loads(Path(str(snapshot) + ".json").read_text())
            step = int(info["global_step"])
            metrics = {}
            for name, extra in phase["runs"].items():
                if step == final_step and name in final:
                    metrics[name] = final[name]["metrics"]
                else:
                    folder = f"curve/{phase['prefix']}step{step}_{name.split(' ')[-1]}"
                    metrics[name] = _evaluate(model, out, snapshot, folder, args.samples, extra)["metrics"]
            rows.append({"step": step, "phase": phase["prefix"].rstrip("_") or args.method.split("+")[0],
                         "train_s": phase["offset_s"] + float(info["train_s"]), "metrics": metrics})
    lines = {n: [(r["train_s"], r["metrics"][n]["fid"]) for r in rows
                 if n in r["metrics"] and r["metrics"][n].get("fid") is not None] for n in names}
    if teacher_fid is not None and rows:
        lines[f"teacher ({teacher_steps} steps)"] = [(rows[0]["train_s"], teacher_fid), (rows[-1]["train_s"], teacher_fid)]
    plot_lines(lines, out / "quality_curve.png", f"{model}: proxy FID of EMA snapshots", "training seconds")
    table = ["| phase | step | training s | " + " | ".join(f"{n} FID | {n} recall" for n in names) + " |",
             "|---|---|---|" + "---|---|" * len(names)]
    for r in rows:
        cells = " | ".join(f"{r['metrics'][n].get('fid', float('nan')):.2f} | "
                           f"{r['metrics'][n].get('recall', float('nan')):.3f}" if n in r["metrics"] else " | "
                           for n in names)
        table.append(f"| {r['phase']} | {r['step']} | {r['train_s']:.0f} | {cells} |")
    return "\n".join(table), rows


def _train(model: str, method: str, out: Path, steps: int, batch: int, points: int, overrides: list[str]) -> Path:
    """One dd.train run of the demo; returns its EMA export."""
    from dd.train import run as run_train

    snapshot = [f"snapshot_every={max(steps // points, 1)}"] if points > 0 else []
    # resume=never: a re-run into the same folder trains a new student (resume=auto would find the finished run's
    # last.ckpt, train nothing and report its export with this session's few seconds as the training time)
    fresh = [] if any(o.startswith("resume=") for o in overrides) else ["resume=never"]
    summary = run_train(_cfg("train", [*fresh, f"model={model}", f"method={method}",
                                       f"data.pairs_dir={out.parent / 'pairs' / 'pairs'}",
                                       f"output_dir={out}", f"max_steps={steps}",
                                       f"batch_size={batch}", f"val_every_steps={max(steps // 4, 1)}",
                                       f"ckpt_every={max(steps // 2, 1)}", *snapshot, *overrides]))
    return Path(summary["export"])


def _earlier_pairs_seconds(out: Path) -> float | None:
    """When ``out`` already holds the complete pairs of an earlier demo run, the seconds that run recorded for
    them (0 when it recorded none), else None: re-running the demo reuses such pairs (generate_pairs skips complete
    shards), so the report gives the time they took to make, not this run's few seconds of checking."""
    manifest = out / "pairs" / "pairs" / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        return None
    results = out / "results.json"
    seconds = json.loads(results.read_text()).get("seconds") if results.is_file() else None
    return float(seconds["pairs_s"]) if seconds and seconds.get("pairs_s") else 0.0


def run_model(model: str, args: argparse.Namespace, out: Path) -> str:
    """pairs -> training (dd+dd2: DD, then DD2 from its student) -> evaluation of one preset; returns its results
    table and timing as markdown."""
    from dd.generate_pairs import run as run_pairs

    size = _sizes(args, model)
    points = _curve_points(args)
    clock = {"start": time.perf_counter()}
    earlier = _earlier_pairs_seconds(out) if args.method != "dd2" else None
    if args.method != "dd2":  # DD2 needs no pairs
        run_pairs(_cfg("generate_pairs", [f"model={model}", f"num_pairs={size.pairs}", f"output_dir={out / 'pairs'}"]))
    clock["pairs"] = time.perf_counter()
    if earlier is not None:  # complete pairs of an earlier run into this folder: report the time they took then
        clock["start"] = clock["pairs"] - earlier
    first = "dd" if args.method == "dd+dd2" else args.method
    exports = [_train(model, first, out / "train", size.steps, size.batch, points, args.train_overrides)]
    clock["train"] = time.perf_counter()
    offsets = [0.0]
    if args.method == "dd+dd2":
        offsets.append(float(json.loads(Path(str(exports[0]) + ".json").read_text())["train_s"]))
        exports.append(_train(model, "dd2", out / "train_dd2", size.dd2_steps, size.dd2_batch, points,
                              [*DD2_FINETUNE[1:], f"method.generator_init={exports[0]}", *args.dd2_overrides]))
    clock["train_dd2"] = time.perf_counter()
    phases = _phases(args.method, exports, offsets)
    runs = {"teacher": ["sampler=teacher"]}
    exported = {"teacher": exports[-1]}
    for phase in phases:
        runs.update(phase["runs"])
        exported.update({name: phase["export"] for name in phase["runs"]})
    if args.method == "dd":
        start = _teacher_start(model, args.teacher_start)
        runs[f"teacher-involved s={start}"] = ["sampler=teacher_involved", f"teacher_start_t={start}"]
        exported[f"teacher-involved s={start}"] = exports[0]
    results = {}
    for name, extra in runs.items():
        folder = name.split(" ")[0].lower().replace("+", "_") + "_" + name.split(" ")[-1].replace("=", "")
        results[name] = (folder, _evaluate(model, out, exported[name], folder, args.samples, extra))
    clock["eval"] = time.perf_counter()
    curve, curve_rows = "", []
    if points > 0:
        teacher_fid = results["teacher"][1]["metrics"].get("fid")
        curve_table, curve_rows = _quality_curve(model, out, phases, args, teacher_fid,
                                                 {n: p for n, (_, p) in results.items()}, results["teacher"][1]["steps"])
        clock["curve"] = time.perf_counter()
        curve = (f"quality against training time (EMA snapshots; {clock['curve'] - clock['eval']:.0f} s to "
                 f"evaluate): ![](quality_curve.png)\n\n{curve_table}\n\n")
    lines = ["| sampler | #Step | FID (classifier features) | IS | precision | recall | label accuracy | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, payload) for name, (_, payload) in results.items()]
    reused = ", generated by an earlier run into this folder and reused" if earlier is not None else ""
    pairs = f"pairs {clock['pairs'] - clock['start']:.0f} s ({size.pairs} pairs{reused})" if args.method != "dd2" \
        else "no pairs"
    training = f"training {clock['train'] - clock['pairs']:.0f} s ({size.steps} steps of {size.batch})"
    if args.method == "dd+dd2":
        training = (f"DD {training}, DD2 fine-tuning {clock['train_dd2'] - clock['train']:.0f} s ({size.dd2_steps} "
                    f"steps of {size.dd2_batch})")
    timing = (f"method {args.method}, profile {args.profile}: {pairs}, {training}, evaluation "
              f"{clock['eval'] - clock['train_dd2']:.0f} s ({args.samples} samples per sampler); total "
              f"{clock['eval'] - clock['start']:.0f} s")
    table = "\n".join(lines)
    curves = "training curves (loss terms, held-out token accuracy per t): ![](train/logs/curves.png)"
    (out / "results.md").write_text(table + "\n\n" + timing + "\n\n" + curve + curves + "\n\n![](comparison.png)\n")
    seconds = {"pairs_s": clock["pairs"] - clock["start"], "train_s": clock["train_dd2"] - clock["pairs"],
               "eval_s": clock["eval"] - clock["train_dd2"]}
    if args.method == "dd+dd2":
        seconds.update(dd_train_s=clock["train"] - clock["pairs"], dd2_train_s=clock["train_dd2"] - clock["train"])
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
    parser.add_argument("--method", choices=("dd", "dd2", "dd+dd2"), default="dd",
                        help="dd: pairs + pair regression (1-step, 2-step, teacher-involved rows); dd2: conditional "
                             "score distillation, no pairs (1-step row; sizes: DD2_PROFILES); dd+dd2: DD, then DD2 "
                             "fine-tunes its student (DD 1-step and DD+DD2 1-step rows; sizes: DD_DD2_PROFILES)")
    parser.add_argument("--dd2-steps", type=int, default=None,
                        help="--method dd+dd2: DD2 fine-tuning steps (default: the profile's)")
    parser.add_argument("--dd2-override", dest="dd2_overrides", action="append", default=[],
                        help="--method dd+dd2: extra dd.train override of the DD2 phase, repeatable "
                             "(--train-override: the DD phase)")
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
    if args.method != "dd+dd2" and (args.dd2_steps is not None or args.dd2_overrides):
        parser.error("--dd2-steps and --dd2-override are for --method dd+dd2 (the DD2 phase after DD)")
    if args.method != "dd" and args.teacher_start is not None:
        parser.error("--teacher-start sets the teacher-involved row, which only --method dd evaluates")
    if args.method == "dd2" and args.pairs is not None:
        parser.error("--pairs: --method dd2 trains without pairs (DD2 draws fresh noise every step)")
    suffix = "" if args.method == "dd" else "_" + args.method.replace("+", "_")
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
                        ("--dd2-steps", getattr(args, "dd2_steps", None)),
                        ("--curve-points", args.curve_points), ("--teacher-start", args.teacher_start)):
        if value is not None:
            command += [flag, str(value)]
    for override in args.train_overrides:
        command += ["--train-override", override]
    for override in getattr(args, "dd2_overrides", []):
        command += ["--dd2-override", override]
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
