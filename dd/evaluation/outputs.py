"""Files of an evaluation run (``<output_dir>/``):

* ``images/000000.png`` ... one PNG per sample, named by its global sample index (seed = seed_base + index);
* ``samples.npz``: ``arr_0`` uint8 (N, H, W, 3) and ``labels`` int64 (N,), the layout the ADM evaluator reads;
* ``grid.png``: a labelled sample grid (see :func:`make_grid` for the layout);
* ``metrics.json``: settings, counts, seeds, checksums, #Step, timings and quality metrics;
* ``config.json``: the resolved config;
* ``eval_state.json``: what a re-run must match to keep the samples (:mod:`dd.evaluation.resume`).

Workers write one ``parts/part_<first>_<count>.pt`` per batch (uint8 images, labels, seeds, timings), atomically, so
a part on disk is a finished batch; rank 0 assembles them with :func:`assemble_parts`, which refuses duplicated or
missing samples. Equal samples give a byte-identical ``samples.npz``.
"""

from __future__ import annotations

import json
import shutil
import struct
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dd.evaluation.batches import EvalBatch

IMAGES_DIR = "images"
PARTS_DIR = "parts"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
METRICS_FILE = "metrics.json"
STATE_FILE = "eval_state.json"
_OUTPUT_NAMES = (IMAGES_DIR, PARTS_DIR, SAMPLES_FILE, GRID_FILE, METRICS_FILE, STATE_FILE, "samples_tmp.npy")


def image_path(directory: Path, index: int) -> Path:
    return Path(directory) / IMAGES_DIR / f"{index:06d}.png"


def clear_outputs(directory: Path) -> None:
    """Remove the outputs of an earlier run in ``directory`` (re-running an evaluation overwrites it)."""
    for name in _OUTPUT_NAMES:
        path = Path(directory) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def part_path(directory: Path, first: int, count: int) -> Path:
    """The part file of samples ``first .. first + count - 1``: the name alone says which samples are done."""
    return Path(directory) / PARTS_DIR / f"part_{first:07d}_{count:06d}.pt"


def part_ranges(directory: Path) -> list[tuple[int, int]]:
    """(first, count) of every finished part file, in sample order (unfinished ``.tmp`` writes are not parts)."""
    ranges = []
    for path in (Path(directory) / PARTS_DIR).glob("part_*_*.pt"):
        first, count = path.stem.split("_")[1:]
        ranges.append((int(first), int(count)))
    return sorted(ranges)


#: this process's sampling session: a resumed evaluation's batches come from several, each with its own warm-up
SESSION = uuid.uuid4().hex[:12]


def write_batch(directory: Path, batch: EvalBatch, write_pngs: bool, rank: int = 0) -> Path:
    """PNG per sample (optional) plus the batch's part file; returns the part path.

    The part is written last and atomically: once it exists, the batch and its PNGs are complete."""
    directory = Path(directory)
    if write_pngs:
        (directory / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for index, image in zip(batch.indices.tolist(), batch.images.numpy()):
            Image.fromarray(image).save(image_path(directory, index))
    path = part_path(directory, int(batch.indices[0]), len(batch.indices))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"indices": batch.indices, "seeds": batch.seeds, "labels": batch.labels, "images": batch.images,
               "model_evals": batch.model_evals, "sampling_s": batch.sampling_s, "decode_s": batch.decode_s,
               "rank": rank, "session": SESSION}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class AssembledSamples:
    """images uint8 (N, H, W, 3) (a read-only memory map of ``samples_tmp.npy``), labels/seeds int64 (N,);
    batches: per-batch (count, sampling_s, decode_s, rank, model_evals) in file order."""

    images: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    batches: list[dict[str, Any]]


def assemble_parts(directory: Path, num_samples: int, delete_parts: bool = True,
                   kept: AssembledSamples | None = None) -> AssembledSamples:
    """Gather every part file into one memory-mapped array; every index 0..num_samples-1 exactly once.

    ``kept``: the first samples, from a finished earlier session (a run whose ``num_samples`` grew); the parts
    supply the rest. Each part is deleted once copied (``delete_parts``): a run killed while assembling samples
    those parts again when resumed (the rest is kept), and a failed check leaves the run to be repeated anyway."""
    directory = Path(directory)
    files = [part_path(directory, first, count) for first, count in part_ranges(directory)]
    if not files and kept is None:
        raise RuntimeError(f"no sample parts found in {directory / PARTS_DIR}")
    seen = np.zeros(num_samples, dtype=bool)
    labels, seeds = np.full(num_samples, -1, np.int64), np.full(num_samples, -1, np.int64)
    images: np.ndarray | None = None
    batches = []
    if kept is not None:
        count = len(kept.labels)
        images = np.lib.format.open_memmap(directory / "samples_tmp.npy", mode="w+", dtype=np.uint8,
                                           shape=(num_samples, *kept.images.shape[1:]))
        images[:count] = kept.images
        labels[:count], seeds[:count], seen[:count] = kept.labels, kept.seeds, True
        batches += kept.batches
    for file in files:
        part = torch.load(file, map_location="cpu", weights_only=True)
        index = part["indices"].numpy()
        if index.min() < 0 or index.max() >= num_samples or seen[index].any():
            raise RuntimeError(f"{file}: sample indices duplicated or outside 0..{num_samples - 1}")
        if images is None:
            images = np.lib.format.open_memmap(directory / "samples_tmp.npy", mode="w+", dtype=np.uint8,
                                               shape=(num_samples, *part["images"].shape[1:]))
        images[index] = part["images"].numpy()
        labels[index], seeds[index], seen[index] = part["labels"].numpy(), part["seeds"].numpy(), True
        batches.append({k: part[k] for k in ("sampling_s", "decode_s", "rank", "model_evals")}
                       | {"count": len(index), "session": part.get("session")})
        if delete_parts:
            file.unlink()  # bounds the disk peak at 50k x 256 px: parts + memory map + npz would be 3 x 9.8 GB
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {num_samples} samples missing from {directory / PARTS_DIR}")
    images.flush()
    return AssembledSamples(np.load(directory / "samples_tmp.npy", mmap_mode="r"), labels, seeds, batches)


def remove_intermediates(directory: Path) -> None:
    """Delete the part files and the temporary memory map once ``samples.npz`` and the metrics exist."""
    shutil.rmtree(Path(directory) / PARTS_DIR, ignore_errors=True)
    (Path(directory) / "samples_tmp.npy").unlink(missing_ok=True)


def write_samples_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``arr_0`` uint8 (N, H, W, 3) + ``labels`` int64 (N,), uncompressed (``np.savez`` streams a memory map).

    Byte-reproducible: ``np.savez`` stamps its zip entries with the zip epoch, not the current time, so equal samples
    give equal files (what a resumed evaluation is checked against)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    tmp = Path(path).with_suffix(".tmp.npz")
    np.savez(tmp, arr_0=images, labels=labels.astype(np.int64))
    tmp.replace(path)
    return Path(path)


def read_samples_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return archive["arr_0"], archive["labels"]


def _stored_member_offset(path: Path, name: str) -> int | None:
    """Byte offset of an uncompressed zip member's data in the file (None when it is compressed)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)  # local file header: fixed 30 bytes, then the name and the extra field
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def open_samples_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a ``samples.npz``, the images as a read-only memory map when the file is uncompressed
    (as dd writes it), so a finished 50k-sample run can be re-scored without loading 10 GB."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    offset = _stored_member_offset(path, "arr_0.npy")
    if offset is None:
        return read_samples_npz(path)
    with open(path, "rb") as handle:
        handle.seek(offset)
        version = np.lib.format.read_magic(handle)
        if version not in readers:
            return read_samples_npz(path)
        shape, fortran_order, dtype = readers[version](handle)
        data_offset = handle.tell()
    images = np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran_order else "C")
    with np.load(path, allow_pickle=False) as archive:
        return images, archive["labels"]


def remove_images(directory: Path, ranges: Sequence[tuple[int, int]]) -> None:
    """Delete the PNGs of the (first, count) ranges about to be sampled again: a killed batch may have left some,
    possibly half-written, and a session without images would not overwrite them."""
    for first, count in ranges:
        for index in range(first, first + count):
            image_path(directory, index).unlink(missing_ok=True)


def write_missing_pngs(directory: Path, images: np.ndarray) -> int:
    """The PNG of every sample that has none yet (samples kept from a run with ``write_images=false``)."""
    (Path(directory) / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(len(images)):
        path = image_path(directory, index)
        if not path.is_file():
            Image.fromarray(np.asarray(images[index])).save(path)
            written += 1
    return written


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _grid_selection(labels: np.ndarray, num_classes: int, max_rows: int, per_row: int) -> list[tuple[int, list[int]]]:
    """(row label or -1, sample indices) per row."""
    if num_classes <= max_rows:
        rows = [(c, np.flatnonzero(labels == c)[:per_row].tolist()) for c in range(num_classes)]
        return [(c, idx) for c, idx in rows if idx]
    first = list(range(min(len(labels), max_rows * per_row)))
    return [(-1, first[i:i + per_row]) for i in range(0, len(first), per_row)]


def make_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, class_names: Sequence[str] | None = None,
              max_rows: int = 10, per_row: int = 10) -> Image.Image:
    """A labelled grid of samples (uint8 (N, H, W, 3), labels (N,)).

    Few classes (num_classes <= max_rows): one row per class in class order, the first ``per_row`` samples of that
    class by sample index, the class id (and name) written in a margin on the left. Many classes: the first
    ``max_rows * per_row`` samples in sample-index order, ``per_row`` per row, each tile's class id written in its
    top-left corner.
    """
    rows = _grid_selection(labels, num_classes, max_rows, per_row)
    h, w = images.shape[1:3]
    by_class = num_classes <= max_rows
    margin = 110 if by_class else 0
    canvas = Image.new("RGB", (margin + per_row * w, max(1, len(rows)) * h), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for r, (label, indices) in enumerate(rows):
        for c, index in enumerate(indices):
            canvas.paste(Image.fromarray(images[index]), (margin + c * w, r * h))
            if not by_class:
                draw.text((c * w + 2, r * h + 1), str(int(labels[index])), fill="yellow", font=font,
                          stroke_width=1, stroke_fill="black")
        if by_class:
            name = f": {class_names[label]}" if class_names is not None and label < len(class_names) else ""
            draw.text((3, r * h + max(0, h // 2 - 7)), f"class {label}{name}", fill="black", font=font)
    return canvas


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def npz_is_readable(path: Path) -> bool:
    """True when ``path`` is a complete ``.npz`` (used by tests and the summary script)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {"arr_0.npy", "labels.npy"} <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
