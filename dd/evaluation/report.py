"""``metrics.json`` of an evaluation run: settings, counts, seeds, checksums, #Step, timings and quality.

Timing convention ("wall time of generating one image", method.md §5.4): per batch, the device-synchronised wall
time of sampling and of decoding, divided by the batch size. ``*_s_per_image`` averages over all batches;
``*_s_per_image_steady`` leaves out each rank's first batch of every sampling session (CUDA/cache warm-up,
compilation; a resumed evaluation has one session per run) when there is more than one.
Numbers are per device and depend on the batch size (batch 1 = latency, large batches = throughput).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

FULL_SCALE_NUM_SAMPLES = 50_000
INCEPTION_EXTRACTOR = "inception-v3-compat"


def timing_summary(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-image sampling and decode seconds from per-batch records (count, sampling_s, decode_s, rank)."""
    def per_image(records: Sequence[dict[str, Any]], key: str) -> float | None:
        count = sum(r["count"] for r in records)
        return sum(r[key] for r in records) / count if count else None

    first_of_rank = {}  # (session, rank) -> index of its first batch; records from before sessions: None
    for i, record in enumerate(batches):
        first_of_rank.setdefault((record.get("session"), record["rank"]), i)
    firsts = set(first_of_rank.values())
    steady = [r for i, r in enumerate(batches) if i not in firsts]
    return {
        "sampling_s_per_image": per_image(batches, "sampling_s"),
        "decode_s_per_image": per_image(batches, "decode_s"),
        "sampling_s_per_image_steady": per_image(steady, "sampling_s") if steady else None,
        "decode_s_per_image_steady": per_image(steady, "decode_s") if steady else None,
        "sampling_s_per_batch_median": statistics.median(r["sampling_s"] for r in batches),
        "num_batches": len(batches),
        "num_ranks": len({rank for _, rank in first_of_rank}),
    }


def fid_proxy_reason(num_samples: int, extractor: str) -> str | None:
    """Why an FID is not comparable with the paper's FID-50k (None when it is)."""
    reasons = []
    if num_samples < FULL_SCALE_NUM_SAMPLES:
        reasons.append(f"{num_samples} < {FULL_SCALE_NUM_SAMPLES} samples")
    if extractor != INCEPTION_EXTRACTOR:
        reasons.append(f"feature extractor {extractor}, not Inception-v3")
    return "; ".join(reasons) or None


def check_model_evals(batches: Sequence[dict[str, Any]], expected: int) -> int:
    """Every batch must report the same #Step as the sampler's own count."""
    found = {int(r["model_evals"]) for r in batches}
    if found != {int(expected)}:
        raise RuntimeError(f"model evaluations per image {sorted(found)} differ from the expected {expected}")
    return int(expected)
