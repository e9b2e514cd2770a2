#!/usr/bin/env python
"""Wall time per image: teacher AR sampling vs DD students (1 step, 2 steps, teacher-involved), side by side.

For each model size (preset YAML, random weights: speed does not depend on the values) and batch size, times the
exact code paths of ``dd.eval`` (``dd.evaluation.samplers``):

* ``teacher``: the teacher's own AR loop over the whole sequence (KV cache, CFG and top-k/top-p from the preset's
  ``sampling``: cfg 2.0, top-k 8000 for GPT-B/L; VAR cfg 2.0, top-k 900, top-p 0.95), seeded multinomial draws;
* ``DD 1-step`` (t_list [0]), ``DD 2-step`` (the preset's t_list: [0, 80] tokens for GPT-B/L, [0, 5] / [0, 4]
  scales for VAR-d16 / d20) and ``DD teacher-involved`` (student step, teacher regenerates timesteps s .. t2-1,
  student step at t2; s = ``--teacher-start``, default 3/4 of t2: 60 for GPT-B/L = Table 2's "pre-trained-61-81",
  22 steps; 4 for VAR-d16 = "VAR-pre-trained-5-6", 3 steps);
* ``decode``: the tokenizer's decoder (256 px), reported separately and added for the "total" columns.

``--fast-paths`` times every method once per path (``dd.acceleration``: ``eager``, ``compile``, ``cuda_graph``;
on CUDA the default is ``eager,cuda_graph``, elsewhere ``eager``) and prints them side by side. ``eager`` is dd's
plain loop, the official algorithm kernel for kernel (the LlamaGen decode step attends over the filled cache prefix
where the official code masks the whole cache: same logits, less work), so "fast <= eager" also bounds the official
loop. A fast path's first call per shape compiles or captures; it is part of the untimed warm-up (at least one).

Honest timing: inputs prepared beforehand, ``--warmup`` untimed runs per measurement, CUDA synchronised around every
timed call, median of ``--repeats``. Per-image time = batch time / batch size (batch 1 = latency, as in the paper).

    python scripts/bench_speed.py --quick                                   # CPU: GPT-B, batch 1 and 4
    python scripts/bench_speed.py --sizes var_d16,var_d20 --batches 1,8 --repeats 2 --threads 1   # CPU, VAR rows
    python scripts/bench_speed.py --device cuda --dtype bf16 --sizes gpt_b,gpt_l,var_d16,var_d20 --batches 1,64
    python scripts/bench_speed.py --device cpu --sizes gpt_test,var_test --batches 1,2 --fast-paths eager,compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dd.acceleration import check_fast_path
from dd.evaluation.samplers import EvalModels, FewStepSampler, TeacherInvolvedSampler, TeacherSampler
from dd.models.presets import random_weights, spec_from_yaml
from dd.sampling.seeds import per_sample_labels, per_sample_normal, per_sample_uniform, sample_seeds

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    size: str
    batch: int
    method: str
    steps: int
    sampling_s: float  # per image, median over repeats
    decode_s: float  # per image
    runs: int
    path: str = "eager"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_models(size: str, device: torch.device, dtype: torch.dtype | None, seed: int = 0):
    """Preset spec, family (tokenizer + teacher) and student, all with seeded random weights, on ``device``."""
    spec = spec_from_yaml(REPO / "configs" / "model" / f"{size}.yaml")
    tokenizer, teacher = spec.build_tokenizer(load=False), spec.build_teacher(load=False)
    for i, model in enumerate((tokenizer, teacher)):
        random_weights(model, seed + i)
    family = spec.make_family(tokenizer.to(device).eval(), teacher.to(device).eval(), teacher_dtype=dtype)
    student = spec.build_student(family.codebook(), init="random")
    random_weights(student, seed + 2)
    student.set_codebook(family.codebook())
    return spec, family, student.to(device).eval()


def methods(spec, teacher_start: int | None) -> list[tuple[str, object]]:
    """teacher_start None: 3/4 of the second timestep (GPT-B/L: 60 of 80 = Table 2's 22 steps; VAR-d16: 4 of 5
    scales = Table 2's 3 steps)."""
    split, t_list = spec.default_split_t, tuple(spec.default_t_list)
    if teacher_start is None:
        teacher_start = min(t_list[1] - 1, round(0.75 * t_list[1]))
    num_timesteps = spec.num_timesteps
    chosen = [("teacher", TeacherSampler(spec.sampling)),
              ("DD 1-step", FewStepSampler((0,), split)),
              (f"DD 2-step t={list(t_list)}", FewStepSampler(t_list, split)),
              (f"DD teacher-involved s={teacher_start}",
               TeacherInvolvedSampler(t_list, split, teacher_start, spec.sampling))]
    for _, sampler in chosen:
        sampler.validate(num_timesteps, num_timesteps)  # e.g. --teacher-start beyond t_list[1]
    return chosen


def set_fast_path(models: EvalModels, path: str) -> None:
    """Teacher decode steps and student trunk through ``path`` (new compiled programs / graphs per path)."""
    models.family.set_fast_path(path)
    models.student.set_fast_path(path)


@torch.no_grad()
def bench_size(size: str, batches: list[int], args: argparse.Namespace, device: torch.device) -> list[Row]:
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    spec, family, student = build_models(size, device, dtype)
    models = EvalModels(family, student)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None)  # noqa: E731
    rows = []
    for batch in batches:
        seeds = sample_seeds(0, 0, batch)
        labels = per_sample_labels(seeds, family.num_classes).to(device)
        noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim), device=device)
        uniforms = per_sample_uniform(seeds, family.sequence_length, device=device)
        sequence = None
        results = []
        for path in args.fast_paths:
            set_fast_path(models, path)
            warmup = args.warmup if path == "eager" else max(1, args.warmup)  # the first call compiles / captures
            for name, sampler in methods(spec, args.teacher_start):
                if name == "teacher" and args.skip_teacher:
                    continue
                def run(sampler=sampler):
                    with autocast():
                        return sampler.sample(models, labels, noise, uniforms)
                seconds = median_seconds(run, device, warmup, args.repeats)
                sequence = run().sequence if sequence is None else sequence
                results.append((name, sampler.steps(family.num_timesteps), seconds, path))
                print(f"  {size} batch {batch} {name} [{path}]: {seconds / batch:.4g} s/img", flush=True)
        set_fast_path(models, "eager")  # frees the fast paths' caches and graphs before the next batch size
        def decode():
            with autocast():
                return family.decode(sequence)
        decode_s = median_seconds(decode, device, args.warmup, args.repeats) / batch
        print(f"  {size} batch {batch} decode: {decode_s:.4g} s/img", flush=True)
        rows += [Row(size, batch, name, steps, seconds / batch, decode_s, args.repeats, path)
                 for name, steps, seconds, path in results]
    return rows


def machine_description(device: torch.device, args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"- date: {dt.datetime.now().isoformat(timespec='minutes')}",
             f"- device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
             f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
             f"- torch {torch.__version__}, dtype {args.dtype}"
             + (" (autocast; teacher under autocast like dd.eval teacher_dtype=bfloat16)" if args.dtype == "bf16" else "")
             + (f", TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}" if device.type == "cuda" else ""),
             f"- warmup {args.warmup}, repeats {args.repeats} (median), weights random (speed does not depend on them)",
             f"- paths: {', '.join(args.fast_paths)} (dd.acceleration; eager = the official-equivalent loop)"
             + (f", torch.compile backend {os.environ.get('DD_COMPILE_BACKEND', 'inductor')}"
                if "compile" in args.fast_paths else "")]
    if hasattr(os, "getloadavg"):
        lines.append(f"- load average at the end (1/5/15 min): {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return lines


def table(rows: list[Row]) -> list[str]:
    """One path: the classic table (sampling, decode, total, speed-ups against the teacher)."""
    lines = ["| model | batch | method | #Step | sampling s/img | decode s/img | total s/img | speed-up sampling "
             "| speed-up total |", "|---|---|---|---|---|---|---|---|---|"]
    teacher = {(r.size, r.batch): r for r in rows if r.method == "teacher"}
    for r in rows:
        base = teacher.get((r.size, r.batch))
        total = r.sampling_s + r.decode_s
        up = f"{base.sampling_s / r.sampling_s:.1f}x" if base else "-"
        up_total = f"{(base.sampling_s + base.decode_s) / total:.1f}x" if base else "-"
        lines.append(f"| {r.size} | {r.batch} | {r.method} | {r.steps} | {r.sampling_s:.4g} | {r.decode_s:.4g} | "
                     f"{total:.4g} | {up} | {up_total} |")
    return lines


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.1f}x" if numerator and denominator else "-"


def side_by_side(rows: list[Row], paths: list[str]) -> list[str]:
    """Several paths: one line per (model, batch, method) with every path's time, each fast path's time relative
    to eager, and speed-ups against the eager (official-equivalent) teacher and against the same path's teacher."""
    fast = [p for p in paths if p != "eager"]
    header = (["model", "batch", "method", "#Step"] + [f"{p} s/img" for p in paths]
              + [f"{p} / eager" for p in fast] + [f"speed-up {p} vs eager teacher" for p in paths]
              + [f"speed-up {p} vs {p} teacher" for p in fast] + ["decode s/img"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    times = {(r.size, r.batch, r.method, r.path): r for r in rows}
    keys = list(dict.fromkeys((r.size, r.batch, r.method) for r in rows))
    for size, batch, method in keys:
        per_path = {p: times.get((size, batch, method, p)) for p in paths}
        seconds = {p: (r.sampling_s if r else None) for p, r in per_path.items()}
        teacher = {p: getattr(times.get((size, batch, "teacher", p)), "sampling_s", None) for p in paths}
        any_row = next(r for r in per_path.values() if r)
        cells = [size, str(batch), method, str(any_row.steps)]
        cells += [f"{seconds[p]:.4g}" if seconds[p] else "-" for p in paths]
        cells += [f"{seconds[p] / seconds['eager']:.3f}" if seconds[p] and seconds.get("eager") else "-" for p in fast]
        cells += [_ratio(teacher.get("eager"), seconds[p]) for p in paths]
        cells += [_ratio(teacher[p], seconds[p]) for p in fast]
        cells.append(f"{any_row.decode_s:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_lines(rows: list[Row], paths: list[str]) -> list[str]:
    """Issue 13's batch-1 goals, read off the table: fast teacher <= eager, fast 1-step <= 0.8x eager 1-step,
    GPT-L fast 1-step <= 10 ms and teacher <= 1.5 s, and the two speed-up ratios."""
    fast = [p for p in paths if p != "eager"]
    if not fast or "eager" not in paths:
        return []
    at = {(r.size, r.method, r.path): r.sampling_s for r in rows if r.batch == 1}
    lines = []
    for size in dict.fromkeys(r.size for r in rows if r.batch == 1):
        for p in fast:
            teacher, teacher_eager = at.get((size, "teacher", p)), at.get((size, "teacher", "eager"))
            one, one_eager = at.get((size, "DD 1-step", p)), at.get((size, "DD 1-step", "eager"))
            if None in (teacher, teacher_eager, one, one_eager):
                continue
            line = (f"- {size}, batch 1, {p}: teacher {teacher:.4g} s ({teacher / teacher_eager:.2f}x eager, goal <= 1), "
                    f"1-step {1000 * one:.3g} ms ({one / one_eager:.2f}x eager, goal <= 0.8); 1-step speed-up "
                    f"{teacher_eager / one:.3g}x vs the eager teacher, {teacher / one:.3g}x vs the {p} teacher")
            if size == "gpt_l":
                line += (f"; GPT-L goals: 1-step <= 10 ms {'met' if one <= 0.010 else 'missed'}, teacher <= 1.5 s "
                         f"{'met' if teacher <= 1.5 else 'missed'}")
            lines.append(line)
    return ["### Goals at batch 1", "", *lines, ""] if lines else []


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sizes", default="gpt_b,gpt_l", help="comma-separated presets from configs/model")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--teacher-start", type=int, default=None,
                        help="teacher_start_t of the teacher-involved row (default: 3/4 of t_list[1], 60 for GPT-B/L)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default; --quick uses 1: on small shared CPUs extra "
                             "OpenMP threads make the memory-bound AR steps much slower)")
    parser.add_argument("--skip-teacher", action="store_true", help="students and decoder only")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA fp32 without TF32 (the official scripts enable it)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU setting: GPT-B, batches 1,4, warmup 1, repeats 2, 1 thread")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--fast-paths", default=None,
                        help="comma-separated dd.acceleration paths timed side by side (eager, compile, cuda_graph); "
                             "default eager,cuda_graph on CUDA, eager elsewhere")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compile path (default inductor; aot_eager for dry runs)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batches, args.warmup, args.repeats = "gpt_b", "1,4", 1, 2
        args.threads = args.threads or 1
    default = "eager,cuda_graph" if torch.device(args.device).type == "cuda" else "eager"
    args.fast_paths = [check_fast_path(p.strip()) for p in (args.fast_paths or default).split(",")]
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_backend:
        os.environ["DD_COMPILE_BACKEND"] = args.compile_backend
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[Row] = []
    for size in args.sizes.split(","):
        rows += bench_size(size.strip(), batches, args, device)
    tables = table(rows) if len(args.fast_paths) == 1 else side_by_side(rows, args.fast_paths)
    report = ["## Measured", "", *machine_description(device, args), "", *tables, "",
              *goal_lines(rows, args.fast_paths)]
    print("\n".join(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))


if __name__ == "__main__":
    main()
