"""Training curves of a distillation run as one PNG next to its CSV log (``<output_dir>/logs/curves.png``).

Three panels against the optimizer step: the loss terms (``train/loss``, ``train/ce``, ``train/mse`` and
``train/perceptual`` when it is on), the training token accuracy of the logits head, and the held-out metrics the
task logs at each validation (``val/token_acc_t<t>`` per t in ``t_list`` and ``val/sample_token_acc_<n>step``).
With the CSV logger the values are read back from its ``metrics.csv`` (so a resumed run plots its whole history);
with other loggers (wandb, none) the callback collects the logged values itself and writes to the run folder.
The plot is drawn with PIL (matplotlib is not a dependency of dd); it is rewritten after every validation and at
the end of training.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from PIL import Image, ImageDraw, ImageFont

CURVES_FILE = "curves.png"
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
#: (title, metric names or prefixes ending in *, log-scale y axis); the loss terms differ by orders of magnitude
PANELS = (("loss terms (log scale)", ("train/loss", "train/ce", "train/mse", "train/perceptual"), True),
          ("training token accuracy", ("train/token_acc",), False),
          ("held-out token accuracy (EMA)", ("val/token_acc_t*", "val/sample_token_acc_*"), False))

Row = dict[str, float]


def read_metrics_csv(path: str | Path) -> list[Row]:
    """Rows of a Lightning ``metrics.csv`` as {column: float}, empty cells left out."""
    rows = []
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            row = {}
            for key, value in record.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def series(rows: Iterable[Row], key: str) -> list[tuple[float, float]]:
    """(step, value) points of one metric, by step (the last value wins when a step was logged twice)."""
    points = {row["step"]: row[key] for row in rows if key in row and "step" in row and math.isfinite(row[key])}
    return sorted(points.items())


def _panel_keys(rows: Sequence[Row], patterns: Sequence[str]) -> list[str]:
    """Columns that match a pattern (a name, or a prefix ending in ``*``) and are not constantly zero (e.g. an
    unused loss term)."""
    names = sorted({key for row in rows for key in row})
    keys = [key for pattern in patterns for key in names
            if key == pattern or pattern.endswith("*") and key.startswith(pattern[:-1])]
    return [key for key in dict.fromkeys(keys) if any(value != 0 for _, value in series(rows, key))]


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
                lines: dict[str, list[tuple[float, float]]], font: ImageFont.ImageFont, log_y: bool = False,
                x_label: str = "step") -> None:
    """Axes with 5 ticks each, one coloured polyline per series, legend under the title. ``log_y``: log10 y axis
    (points <= 0 left out), ticks labelled with the values."""
    if log_y:
        lines = {k: [(x, math.log10(y)) for x, y in v if y > 0] for k, v in lines.items()}
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 62, top + 28 + 14 * len(lines), right - 16, bottom - 36
    draw.text((left + 62, top + 6), title, fill="black", font=font)
    for i, name in enumerate(lines):
        draw.line((x0, top + 30 + 14 * i, x0 + 18, top + 30 + 14 * i), fill=PALETTE[i % len(PALETTE)], width=3)
        draw.text((x0 + 24, top + 23 + 14 * i), name, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text(((x0 + x1) // 2 - 3 * len(x_label), y1 + 20), x_label, fill="black", font=font)
    points = [p for values in lines.values() for p in values]
    if not points:
        draw.text((x0 + 10, (y0 + y1) // 2), "no data", fill="gray", font=font)
        return
    xlo, xhi = min(p[0] for p in points), max(p[0] for p in points)
    ylo, yhi = min(p[1] for p in points), max(p[1] for p in points)
    xhi, ypad = (xhi if xhi > xlo else xlo + 1), ((yhi - ylo) * 0.05 or max(abs(yhi) * 0.05, 0.01))
    ylo, yhi = ylo - ypad, yhi + ypad

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for i in range(5):
        xv, yv = xlo + (xhi - xlo) * i / 4, ylo + (yhi - ylo) * i / 4
        tx, _ = px(xv, ylo)
        _, ty = px(xlo, yv)
        draw.line((tx, y1, tx, y1 + 4), fill="black")
        draw.text((tx - 10, y1 + 6), f"{xv:.0f}", fill="black", font=font)
        draw.line((x0 - 4, ty, x0, ty), fill="black")
        draw.text((left + 4, ty - 7), f"{10 ** yv if log_y else yv:.3g}", fill="black", font=font)
    for i, values in enumerate(lines.values()):
        colour, pixels = PALETTE[i % len(PALETTE)], [px(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for cx, cy in pixels if len(pixels) <= 30 else pixels[-1:]:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)


def plot_curves(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """Write the three-panel PNG of ``rows`` (dicts with a ``step`` and metric columns) to ``path``."""
    font = _font()
    width, height = 480, 420
    image = Image.new("RGB", (width * len(PANELS), height + 22), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill="black", font=font)
    for i, (panel_title, patterns, log_y) in enumerate(PANELS):
        lines = {key: series(rows, key) for key in _panel_keys(rows, patterns)}
        _draw_panel(draw, (i * width, 22, (i + 1) * width, height + 22), panel_title, lines, font, log_y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def plot_lines(lines: dict[str, list[tuple[float, float]]], path: str | Path, title: str, x_label: str,
               width: int = 640, height: int = 440) -> Path:
    """One panel of named (x, y) polylines (e.g. proxy FID against training seconds) as a PNG at ``path``."""
    image = Image.new("RGB", (width, height), "white")
    _draw_panel(ImageDraw.Draw(image), (0, 0, width, height), title, lines, _font(), x_label=x_label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


class TrainingCurves(Callback):
    """Writes ``curves.png`` next to the CSV log (``<logger.log_dir>/curves.png``) after each validation and at
    the end of training; without a CSV logger, the values logged during this run go to ``<fallback_dir>/curves.png``.
    Rank 0 only."""

    def __init__(self, fallback_dir: str | Path, title: str = "") -> None:
        super().__init__()
        self.fallback_dir, self.title = Path(fallback_dir), title
        self.history: list[Row] = []
        self.path: Path | None = None

    def _record(self, trainer: L.Trainer, prefix: str) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
        if row:
            self.history.append({"step": float(trainer.global_step), **row})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val/")
            self.write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def write(self, trainer: L.Trainer) -> Path | None:
        if not trainer.is_global_zero:
            return None
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        rows, folder = self.history, self.fallback_dir
        if csv_logger is not None:
            csv_logger.save()
            metrics_file = Path(csv_logger.experiment.metrics_file_path)
            folder = Path(csv_logger.log_dir)
            if metrics_file.is_file():
                rows = read_metrics_csv(metrics_file)
        self.path = plot_curves(rows, folder / CURVES_FILE, self.title)
        return self.path
