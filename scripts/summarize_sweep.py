#!/usr/bin/env python
"""Collect the metrics.json files of an evaluation sweep into a table and a quality-vs-#Step plot.

    python -m dd.eval -m sampler=teacher_involved teacher_start_t=0,4,8
    python scripts/summarize_sweep.py outputs/eval/multirun/<date_time> [--out DIR]

Writes ``summary.md`` (markdown table), ``summary.csv`` and ``summary.png`` (FID and label accuracy against #Step,
log-scaled #Step axis when it spans more than a factor of 20) into the sweep folder (or ``--out``). Any folder tree
holding metrics.json files works, e.g. several single runs under ``outputs/eval``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLUMNS = ("run", "sampler", "teacher_start_t", "t_list", "split_t", "steps", "num_samples", "fid", "fid_is_proxy",
           "isc", "precision", "recall", "label_accuracy", "sampling_s_per_image", "decode_s_per_image")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per metrics.json under ``sweep_dir``, sorted by #Step then run folder."""
    rows = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        data = json.loads(path.read_text())
        sampler, metrics, timing = data["sampler"], data.get("metrics", {}), data.get("timing", {})
        rows.append({
            "run": str(path.parent.relative_to(sweep_dir)) or ".",
            "sampler": sampler.get("kind"),
            "teacher_start_t": sampler.get("teacher_start_t"),
            "t_list": "-".join(str(t) for t in sampler["t_list"]) if "t_list" in sampler else None,
            "split_t": sampler.get("split_t"),
            "steps": data["steps"],
            "num_samples": data["num_samples"],
            "fid": metrics.get("fid"),
            "fid_is_proxy": data.get("fid_is_proxy"),
            "isc": metrics.get("isc_mean"),
            "precision": metrics.get("precision"),
            "recall": metrics.get("recall"),
            "label_accuracy": metrics.get("label_accuracy"),
            "sampling_s_per_image": timing.get("sampling_s_per_image"),
            "decode_s_per_image": timing.get("decode_s_per_image"),
        })
    return sorted(rows, key=lambda r: (r["steps"], r["run"]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_markdown(rows: list[dict[str, Any]], path: Path) -> Path:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- a small PIL line plot (matplotlib is not a dependency of dd) ------------------------------------------------
def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], points: list[tuple[float, float]],
           title: str, log_x: bool, font: ImageFont.ImageFont) -> None:
    """Axes, ticks and a connected scatter of (steps, value) in box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 30, right - 20, bottom - 40
    draw.text((left + 60, top + 5), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text(((x0 + x1) // 2 - 40, y1 + 22), "#Step (model evals / image)", fill="black", font=font)
    if not points:
        draw.text((x0 + 10, (y0 + y1) // 2), "no data", fill="gray", font=font)
        return
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad, ypad = (xhi - xlo) * 0.05 or 0.5, (yhi - ylo) * 0.1 or max(abs(yhi) * 0.1, 0.05)
    xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for value in sorted({p[0] for p in points}):
        px, _ = to_px(fx(value), ylo)
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.text((px - 8, y1 + 6), f"{value:g}", fill="black", font=font)
    for value in _ticks(ylo + ypad, yhi - ypad):
        _, py = to_px(xlo, value)
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.text((left + 2, py - 6), f"{value:.4g}", fill="black", font=font)
    pixels = [to_px(x, y) for x, y in sorted(zip(xs, ys))]
    if len(pixels) > 1:
        draw.line(pixels, fill=(31, 119, 180), width=2)
    for px, py in pixels:
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=(31, 119, 180))


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """FID (left) and label accuracy (right) against #Step."""
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:
        font = ImageFont.load_default()
    image = Image.new("RGB", (960, 400), "white")
    draw = ImageDraw.Draw(image)
    steps = [r["steps"] for r in rows]
    log_x = bool(steps) and max(steps) / max(min(steps), 1) > 20
    proxy = any(r["fid_is_proxy"] for r in rows)
    for i, (key, title) in enumerate((("fid", "FID (proxy)" if proxy else "FID"), ("label_accuracy", "label accuracy"))):
        points = [(float(r["steps"]), float(r[key])) for r in rows if r[key] is not None]
        _panel(draw, (i * 480, 0, (i + 1) * 480, 400), points, title, log_x, font)
    image.save(path)
    return path


def summarize(sweep_dir: Path, out: Path | None = None) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"no metrics.json found under {sweep_dir}")
    return {"markdown": write_markdown(rows, out / "summary.md"), "csv": write_csv(rows, out / "summary.csv"),
            "plot": write_plot(rows, out / "summary.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="folder holding the sweep's job folders (metrics.json files)")
    parser.add_argument("--out", type=Path, default=None, help="where to write summary.{md,csv,png} (default: sweep_dir)")
    args = parser.parse_args()
    paths = summarize(args.sweep_dir, args.out)
    print(paths["markdown"].read_text(), end="")
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")


if __name__ == "__main__":
    main()
