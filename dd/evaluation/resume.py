"""Resuming an evaluation run: which samples are already on disk, and whether they were made as today's run would.

``<output_dir>/eval_state.json`` records what determines the samples: the settings (model config without file
references, sampler, sample count, seeds, labels, numerics), the checksums of the weights that made them, whether a
session completed and, once one has, how many samples its ``samples.npz`` holds and their per-batch records (count,
timings, #Step) that ``metrics.json`` summarises.

Sample i depends only on these and its seed ``seed_base + i`` (:mod:`dd.evaluation.batches`), so a run that stopped
part-way is finished by sampling the missing indices alone, and a finished run whose ``num_samples`` grew samples the
new indices alone (a smaller ``num_samples`` is refused: a re-run never drops samples). Missing indices are cut on the
batch grid of the current ``batch_size``: with the batch size of the interrupted run these are exactly the batches an
uninterrupted run would have sampled, so every output file comes out byte-identical (likewise for a grown run whose
earlier count was a multiple of the batch size); otherwise the images agree up to the float rounding of batched
kernels, as between any two batch sizes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dd.evaluation.outputs import PARTS_DIR, SAMPLES_FILE, STATE_FILE, npz_is_readable, part_ranges, write_json

FORMAT_VERSION = 1
#: ``auto``: keep the samples of an earlier run with the same settings and weights, refuse other ones;
#: ``never``: discard whatever the folder holds and start over
RESUME_MODES = ("auto", "never")
_MAX_LISTED_DIFFERENCES = 4
#: settings a re-run may change: the sample count may grow (sample i does not depend on it)
GROWABLE_SETTINGS = ("num_samples",)


class ResumeMismatchError(ValueError):
    """The folder holds samples made with other settings or weights: resuming would mix two evaluations."""


def read_state(directory: Path) -> dict[str, Any] | None:
    """The folder's ``eval_state.json`` (None when there is none)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # written atomically, so only a foreign or hand-edited file gets here
        raise ResumeMismatchError(f"{path} is unreadable ({err})") from err
    if state.get("format_version") != FORMAT_VERSION:
        raise ResumeMismatchError(f"{path} has format version {state.get('format_version')!r}, this dd writes "
                                  f"{FORMAT_VERSION}")
    return state


def write_state(directory: Path, state: Mapping[str, Any]) -> Path:
    Path(directory).mkdir(parents=True, exist_ok=True)
    return write_json(Path(directory) / STATE_FILE, dict(state))


def new_state(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The state of a run that has sampled nothing yet; its weight checksums are filled in once models are built."""
    return {"format_version": FORMAT_VERSION, "settings": dict(settings), "checksums": None, "complete": False,
            "finished_samples": 0, "batches": None, "created_at": dt.datetime.now().isoformat(timespec="seconds"),
            "sessions": 0}


def differences(existing: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves where two JSON-like values differ, each with both values."""
    if isinstance(existing, Mapping) and isinstance(current, Mapping):
        found = []
        for key in sorted(set(existing) | set(current), key=str):
            found += differences(existing.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    # compared as JSON so that tuples match the lists a state file reads back
    if json.dumps(existing, sort_keys=True, default=str) == json.dumps(current, sort_keys=True, default=str):
        return []
    return [f"{prefix or 'value'}: before {existing!r}, now {current!r}"]


def check_same(existing: Mapping[str, Any], current: Mapping[str, Any], what: str) -> None:
    """Raise :class:`ResumeMismatchError` naming the first differences when ``existing`` != ``current``."""
    found = differences(existing, current)
    if found:
        listed = "; ".join(found[:_MAX_LISTED_DIFFERENCES])
        more = f" (+{len(found) - _MAX_LISTED_DIFFERENCES} more)" if len(found) > _MAX_LISTED_DIFFERENCES else ""
        raise ResumeMismatchError(f"its samples were made with other {what}: {listed}{more}")


def fixed_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a re-run must keep to resume (all but :data:`GROWABLE_SETTINGS`)."""
    return {key: value for key, value in settings.items() if key not in GROWABLE_SETTINGS}


def finished_samples(directory: Path, state: Mapping[str, Any] | None) -> int:
    """How many samples (indices 0..n-1) the ``samples.npz`` of the last finished session holds; 0 before any
    session finished. The part files of those samples are gone by then."""
    if not (state and state.get("complete")) or not npz_is_readable(Path(directory) / SAMPLES_FILE):
        return 0
    return int(state.get("finished_samples", state["settings"]["num_samples"]))  # states from before the field


def holds_samples(directory: Path, state: Mapping[str, Any] | None) -> bool:
    """True when the folder keeps samples of its run: a finished session's or finished batches' (part files)."""
    return finished_samples(directory, state) > 0 or bool(part_ranges(directory))


def done_mask(directory: Path, num_samples: int) -> np.ndarray:
    """bool (num_samples,): the samples some finished part file holds."""
    done = np.zeros(num_samples, dtype=bool)
    for first, count in part_ranges(directory):
        done[first:min(first + count, num_samples)] = True
    return done


def missing_ranges(done: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """(first, count) batches covering the samples not ``done``: each run of missing samples is cut at the multiples
    of ``batch_size``, the boundaries of an uninterrupted run's batches."""
    ranges = []
    index, total = 0, len(done)
    while index < total:
        if done[index]:
            index += 1
            continue
        end = min((index // batch_size + 1) * batch_size, total)
        stop = index + int(np.argmax(done[index:end])) if done[index:end].any() else end
        ranges.append((index, stop - index))
        index = stop
    return ranges


def remove_partial_writes(directory: Path) -> None:
    """Delete files a killed run left half-written (every dd output is written to a temporary name first)."""
    directory = Path(directory)
    for stale in [*(directory / PARTS_DIR).glob("*.tmp"), *directory.glob("*.tmp*")]:
        stale.unlink(missing_ok=True)


def batch_records(batches: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-batch records as plain JSON values (``metrics.json`` timings of a re-scored complete run)."""
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in record.items()}
            for record in batches]
