"""Pair-generation throughput vs plain teacher sampling, side by side in one run.

Measures pairs/s of the teacher's AR loop with (a) ordinary multinomial sampling and (b) the flow-matching map for
several solver settings, at a real model size (default GPT-B shape over the VQ-16 codebook; VAR-d16 shape over the
4096 x 32 multi-scale codebook with ``--preset var_d16``; random weights: speed does not depend on the values), with
the preset's own teacher sampling settings unless overridden. Prints a markdown table with the flow-map overhead as
a ratio.

    python scripts/bench_pairs.py --preset gpt_b --batch 8 --repeats 3            # CPU
    python scripts/bench_pairs.py --preset var_d16 --batch 8 --repeats 3          # CPU, VAR (one flow solve per scale)
    python scripts/bench_pairs.py --preset gpt_b --batch 256 --device cuda --dtype bf16
    python scripts/bench_pairs.py --preset gpt_b --batch 1 --device cuda --fast-paths eager,cuda_graph \
        --flow-fast-paths eager,cuda_graph --settings dpmpp_2m:100 --repeats 2      # GPU fast paths, batch 1

``--fast-paths`` runs the whole table once per teacher decode path (``dd.acceleration``; overheads are relative to
multinomial sampling with the same teacher path), ``--flow-fast-paths`` times each flow setting once per ODE-solve
path (``FlowMapConfig.fast_path``). Rows with a non-eager path get one untimed warm-up (compile / capture).
``--supports`` times each flow setting once per ``FlowMapConfig.support`` (``auto``: the default, solves over the
top-k / top-p support when it is <= V/4; ``dense``: all V codes; ``compact``: always over the support):

    python scripts/bench_pairs.py --preset var_d16 --batch 4 --repeats 1 --threads 1 --settings dpmpp_2m:100 \
        --supports dense,auto                                                       # support restriction
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dataclasses

from dd.acceleration import check_fast_path
from dd.flow import FlowMapConfig
from dd.models.presets import random_weights, spec_from_yaml
from dd.pairs.generation import FlowChooser
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.seeds import per_sample_normal, per_sample_uniform, sample_seeds

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [("dpmpp_2m", 25, "uniform", 2.0), ("dpmpp_2m", 50, "uniform", 2.0), ("dpmpp_2m", 100, "uniform", 2.0),
            ("euler", 200, "uniform", 2.0)]


def parse_setting(text: str) -> tuple[str, int, str, float]:
    """``solver:steps[:grid]`` -> (solver, steps, grid, grid power); grid ``powerP`` (e.g. ``power1.5``) is the power
    grid with exponent P (``FlowMapConfig.grid_power``), ``power`` alone exponent 2."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--settings entry {text!r}: expected solver:steps[:grid], e.g. dpmpp_2m:100 or "
                         "dpmpp_2m:50:power1.5")
    grid = parts[2] if len(parts) == 3 else "uniform"
    power = 2.0
    if grid.startswith("power") and grid != "power":
        try:
            power = float(grid[len("power"):])
        except ValueError:
            raise SystemExit(f"--settings entry {text!r}: grid {grid!r} is not power<number>, e.g. power1.5") from None
        grid = "power"
    return parts[0], int(parts[1]), grid, power


def setting_name(setting: tuple[str, int, str, float]) -> str:
    solver, steps, grid, power = setting
    return f"{solver} {steps} steps ({grid}{f' {power:g}' if grid == 'power' else ''})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the preset's sampling.cfg_scale")
    parser.add_argument("--top-k", type=int, default=None, help="default: the preset's sampling.top_k")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--fast-paths", default="eager", help="teacher decode paths, comma-separated")
    parser.add_argument("--flow-fast-paths", default="eager", help="flow-map ODE-solve paths, comma-separated")
    parser.add_argument("--settings", default=None,
                        help="flow settings solver:steps[:grid], comma-separated (default: the four of the README)")
    parser.add_argument("--supports", default="auto",
                        help="FlowMapConfig.support values (auto, dense, compact), comma-separated; each flow setting "
                             "is timed once per value (rows are labelled [support ...] unless only auto is given)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_backend:
        os.environ["DD_COMPILE_BACKEND"] = args.compile_backend
    teacher_paths = [check_fast_path(p.strip()) for p in args.fast_paths.split(",")]
    flow_paths = [check_fast_path(p.strip()) for p in args.flow_fast_paths.split(",")]
    settings = SETTINGS if args.settings is None else [parse_setting(item) for item in args.settings.split(",")]
    supports = [item.strip() for item in args.supports.split(",")]
    for support in supports:
        FlowMapConfig(support=support)  # refuses an unknown value before any model is built
    device = torch.device(args.device)
    spec = spec_from_yaml(REPO / "configs" / "model" / f"{args.preset}.yaml")
    teacher, tokenizer = spec.build_teacher(load=False), spec.build_tokenizer(load=False)
    random_weights(teacher, 0)
    random_weights(tokenizer, 1)
    family = spec.make_family(tokenizer.to(device).eval(), teacher.to(device).eval())
    overrides = {"cfg_scale": args.cfg_scale, "top_k": args.top_k}
    sampling = dataclasses.replace(spec.sampling, **{k: v for k, v in overrides.items() if v is not None})
    length, dim = family.sequence_length, family.token_dim
    seeds = sample_seeds(0, 0, args.batch)
    labels = torch.arange(args.batch, device=device) % family.num_classes
    codebook = family.codebook().detach()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def plain() -> None:
        chooser = SeededMultinomialChooser(per_sample_uniform(seeds, length, device=device))
        with autocast:
            family.teacher_generate(labels, 0, family.num_timesteps, None, sampling, chooser)

    def flow(setting: tuple[str, int, str, float], flow_path: str, support: str) -> None:
        solver, steps, grid, power = setting
        noise = per_sample_normal(seeds, (length, dim), device=device)
        config = FlowMapConfig(solver=solver, num_steps=steps, time_grid=grid, grid_power=power, fast_path=flow_path,
                               support=support)
        chooser = FlowChooser(noise, codebook, config)
        with autocast:
            family.teacher_generate(labels, 0, family.num_timesteps, None, sampling, chooser)

    lines = [f"preset {args.preset} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M teacher, "
             f"{length} tokens, V={codebook.shape[0]}), batch {args.batch}, CFG {sampling.cfg_scale}, top-k "
             f"{sampling.top_k}, top-p {sampling.top_p},"
             f" device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}"
             + (f", torch.compile backend {os.environ.get('DD_COMPILE_BACKEND', 'inductor')}"
                if "compile" in teacher_paths + flow_paths else ""),
             "", "| teacher path | token choice | s / batch | pairs/s | time vs multinomial | flow-map overhead |",
             "|---|---|---|---|---|---|"]
    for teacher_path in teacher_paths:
        family.set_fast_path(teacher_path)
        rows: dict[str, Callable[[], None]] = {"multinomial": plain}
        for setting in settings:
            for flow_path in flow_paths:
                for support in supports:
                    suffix = "" if flow_path == "eager" else f" [flow {flow_path}]"
                    suffix += "" if supports == ["auto"] else f" [support {support}]"
                    rows[f"{setting_name(setting)}{suffix}"] = \
                        lambda s=setting, f=flow_path, u=support: flow(s, f, u)
        plain()  # warm-up (and the teacher path's compile / capture)
        for name, fn in rows.items():
            if name != "multinomial" and (teacher_path != "eager" or "[flow" in name):
                fn()  # compile / capture the flow solve before timing
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):  # interleaved so drifts in machine load hit every row alike
            for name, fn in rows.items():
                times[name].append(_time(fn, device))
        base = statistics.median(times["multinomial"])
        for name, values in times.items():
            t = statistics.median(values)
            lines.append(f"| {teacher_path} | {name} | {t:.4g} | {args.batch / t:.4g} | {t / base:.3f}x | "
                         f"{100 * (t / base - 1):+.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
