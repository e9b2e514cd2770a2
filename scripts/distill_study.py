"""One row of the distillation-recipe study (docs/distillation_study.md): train a student on an existing pair set with
the given ``dd.train`` overrides, evaluate it with the demo's protocol, append the row to ``<out>/rows.jsonl``.

    python scripts/distill_study.py --name base --pairs outputs/study/gpt_tiny_pairs10k/pairs
    python scripts/distill_study.py --name lr1e-3 --pairs ... -- optim.lr=1e-3 ema_decay=0.99
    python scripts/distill_study.py --name teacher --samplers teacher     # the teacher row (no training)

Evaluation = ``scripts/demo.py``'s: 1,000 samples, balanced labels, seed_base 100000, so every row (and the demo)
sees the same labels and noise. ``--samplers`` picks from teacher, 1step, 2step, ti (teacher-involved from
``--teacher-start``) and 1step_raw (1 step with the raw instead of the EMA weights); the student samplers use the
run's own ``schedule.t_list`` / ``schedule.split_t``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from demo import _cfg, _teacher_start  # noqa: E402  (the demo's Hydra composition helper, its default s)

EVAL = ["labels=balanced", "seed_base=100000", "write_images=false"]


def _metrics(payload: dict[str, Any]) -> dict[str, Any]:
    keep = ("fid", "precision", "recall", "label_accuracy", "isc_mean")
    return {k: payload["metrics"].get(k) for k in keep} | {"steps": payload["steps"]}


def _raw_key(model: str) -> str:
    """The export key of a preset family's raw (not EMA) student weights (LlamaGen ``model``, VAR
    ``trainer.var_wo_ddp``): the spec's second export key."""
    from hydra.utils import instantiate

    return instantiate(_cfg("eval", [f"model={model}"])["model"], _convert_="all").export_keys[1]


def _evaluate(args: argparse.Namespace, out: Path, export: Path | None, sampler: str,
              schedule: dict[str, Any]) -> dict[str, Any]:
    from dd.eval import run as run_eval

    t_list, split = list(schedule["t_list"]), int(schedule["split_t"])
    raw_key = _raw_key(args.model) if sampler == "1step_raw" else None  # builds the preset's spec: only when asked
    extra = {"teacher": ["sampler=teacher"],
             "1step": ["sampler=fewstep", "schedule.t_list=[0]", f"schedule.split_t={split}"],
             "2step": ["sampler=fewstep", f"schedule.t_list={t_list}", f"schedule.split_t={split}"],
             "1step_raw": ["sampler=fewstep", "schedule.t_list=[0]", f"schedule.split_t={split}",
                           f"student.checkpoint_key={raw_key}"],  # the raw (not EMA) weights of the export
             "ti": ["sampler=teacher_involved", f"teacher_start_t={args.teacher_start}",
                    f"schedule.t_list={t_list}", f"schedule.split_t={split}"]}[sampler]
    folder = f"ti_s{args.teacher_start}" if sampler == "ti" else sampler
    overrides = [f"model={args.model}", f"num_samples={args.samples}", *EVAL, f"output_dir={out / 'eval' / folder}",
                 "resume=never", *extra]
    if export is not None:
        overrides.append(f"student.checkpoint={export}")
    start = time.perf_counter()
    payload = run_eval(_cfg("eval", [o.replace(" ", "") for o in overrides]))
    return _metrics(payload) | {"eval_s": round(time.perf_counter() - start, 1)}


def _train(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any], float, dict[str, Any]]:
    from dd.train import run as run_train

    cfg = _cfg("train", [f"model={args.model}", f"data.pairs_dir={args.pairs}", f"output_dir={out / 'train'}",
                         f"max_steps={args.steps}", f"batch_size={args.batch}", "resume=never",
                         f"val_every_steps={max(args.steps // 2, 1)}", f"ckpt_every={args.steps}",
                         *args.overrides])
    start = time.perf_counter()
    summary = run_train(cfg)
    return Path(summary["export"]), cfg, time.perf_counter() - start, summary["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="gpt_tiny")
    parser.add_argument("--pairs", default="outputs/study/gpt_tiny_pairs10k/pairs")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--samplers", default="1step,2step")
    parser.add_argument("--teacher-start", type=int, default=None,
                        help="teacher_start_t of the ti sampler (default: the demo's, a third of t_list[1])")
    parser.add_argument("--out", default="outputs/study")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the run trained earlier under --name")
    parser.add_argument("overrides", nargs="*", help="dd.train overrides (after --)")
    args = parser.parse_args()
    args.teacher_start = _teacher_start(args.model, args.teacher_start)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.model / args.name
    samplers = args.samplers.split(",")
    row: dict[str, Any] = {"name": args.name, "model": args.model, "pairs": args.pairs, "steps": args.steps,
                           "batch": args.batch, "overrides": args.overrides,
                           "command": "python " + shlex.join(["scripts/distill_study.py", *sys.argv[1:]])}
    if samplers == ["teacher"]:
        schedule, export = _cfg("eval", [f"model={args.model}"])["schedule"], None
    elif args.eval_only:  # more samplers for a row trained earlier
        export = out / "train" / "export" / "student_ema.pt"
        schedule = json.loads(Path(str(export) + ".json").read_text())["schedule"]
        row["eval_only"] = True
    else:
        export, cfg, train_s, val = _train(args, out)
        schedule = cfg["schedule"]
        row |= {"train_s": round(train_s, 1), "schedule": schedule, "loss": cfg["loss"], "optim": cfg["optim"],
                "ema_decay": cfg["ema_decay"], "val": val}
    row["results"] = {f"ti_s{args.teacher_start}" if s == "ti" else s: _evaluate(args, out, export, s, schedule)
                      for s in samplers}
    with open(Path(args.out) / args.model / "rows.jsonl", "a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row["results"], indent=1))


if __name__ == "__main__":
    main()
