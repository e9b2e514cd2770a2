"""Pair shards and their manifest.

Layout of a pair directory::

    manifest.json          settings, teacher identity and checksum, seed range, counts, per-shard checksums
    shard-000000.pt        samples [0, S)            (S = shard_size; the last shard may be shorter)
    shard-000001.pt        samples [S, 2S) ...

A shard is a ``torch.save`` dict of plain tensors (``weights_only``-loadable):
``sample_ids`` int64 (n,), ``seeds`` int64 (n,), ``labels`` int64 (n,), ``indices`` int16/int32 (n, L),
``noise_sum`` float64 (n,), ``max_snap_residual`` float32 (n,), and optionally ``noise`` float32 (n, L, d).

Noise is stored as the per-sample seed: ``noise = per_sample_normal([seed], (L, d))`` regenerates it bit-exactly on
the CPU (8 bytes instead of 4*L*d per pair: 8 KB for LlamaGen, 87 KB for VAR). ``noise_sum`` lets readers verify
the regeneration (a changed torch RNG would be caught, not silently trained on). Shard files are written to a
temporary name and renamed, so a shard file that exists is complete; sample ranges are fixed by the shard index,
so 1 rank and N ranks write identical shards and a re-run skips what is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dd.checkpoint import file_sha256, state_dict_sha256
from dd.pairs.generation import PairBatch
from dd.sampling.seeds import per_sample_normal

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PairFormatError(RuntimeError):
    """Pair shards or manifest are missing, corrupt, or do not match the model they are used with."""


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard-{index:06d}.pt"


def shard_ranges(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    """(first_sample, count) of every shard."""
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"num_pairs={num_pairs} and shard_size={shard_size} must be >= 1")
    return [(first, min(shard_size, num_pairs - first)) for first in range(0, num_pairs, shard_size)]


def noise_sums(noise: torch.Tensor) -> torch.Tensor:
    """(n, L, d) -> (n,) float64 sums, the regeneration check stored per pair."""
    return noise.double().flatten(1).sum(dim=1)


def write_shard(directory: Path, index: int, first_sample: int, batch: PairBatch, token_shape: Sequence[int],
                store_noise: bool = False) -> dict[str, Any]:
    """Write one complete shard atomically; returns its manifest entry."""
    count = batch.labels.shape[0]
    noise = per_sample_normal(batch.seeds.tolist(), token_shape)
    index_dtype = torch.int16 if batch.indices.numel() == 0 or int(batch.indices.max()) < 2**15 else torch.int32
    payload = {
        "sample_ids": torch.arange(first_sample, first_sample + count, dtype=torch.long),
        "seeds": batch.seeds.long(),
        "labels": batch.labels.long(),
        "indices": batch.indices.to(index_dtype),
        "noise_sum": noise_sums(noise),
        "max_snap_residual": batch.max_snap_residual.float(),
    }
    if store_noise:
        payload["noise"] = noise
    path = shard_path(directory, index)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return {"index": index, "file": path.name, "first_sample": first_sample, "count": count,
            "sha256": file_sha256(path)}


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PairFormatError(f"pair shard {path} is unreadable ({type(err).__name__}: {err}); delete it and re-run "
                              f"the same generate_pairs command to regenerate exactly this shard.") from err
    missing = {"sample_ids", "seeds", "labels", "indices", "noise_sum"} - set(shard)
    if missing:
        raise PairFormatError(f"pair shard {path} lacks {sorted(missing)}; delete it and re-run generate_pairs.")
    return shard


def shard_is_complete(path: Path, first_sample: int, count: int) -> bool:
    """True when the shard exists, loads and holds exactly samples [first_sample, first_sample + count)."""
    if not path.is_file():
        return False
    try:
        shard = read_shard(path)
    except PairFormatError:
        return False
    expected = torch.arange(first_sample, first_sample + count)
    return shard["sample_ids"].shape == expected.shape and bool(torch.equal(shard["sample_ids"], expected))


# -- manifest ----------------------------------------------------------------------------------------------------------
def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PairFormatError(f"no {MANIFEST} in {directory}: not a pair directory written by dd.generate_pairs "
                              f"(or the generation never started). Point data.pairs_dir at the run's pairs/ folder.")
    return json.loads(path.read_text())


#: flow settings that change how the map runs, not the pairs (fast paths give the eager indices, the support-restricted
#: solve the dense one's)
EXECUTION_ONLY_FLOW_KEYS = ("fast_path", "support")


def _identity(key: str, value: Any) -> Any:
    if key == "tokenizer" and isinstance(value, Mapping):  # its weights, wherever the file lives
        return value.get("sha256")
    if key == "flow" and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in EXECUTION_ONLY_FLOW_KEYS}
    return value


def check_settings_match(existing: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume into a directory generated with other settings (it would mix two distributions)."""
    keys = ("format_version", "teacher", "tokenizer", "sampling", "flow", "seed_base", "labels", "num_pairs",
            "shard_size", "sequence_length", "token_dim", "store_noise")
    diffs = [k for k in keys if _identity(k, existing.get(k)) != _identity(k, current.get(k))]
    if diffs:
        detail = "; ".join(f"{k}: existing {existing.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
        raise PairFormatError(f"the output directory already holds pairs generated with other settings ({detail}). "
                              f"Use a new run_name, or delete the directory to regenerate.")


# -- reading pairs for training ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairExpectation:
    """What the model being trained needs the pairs to be."""

    sequence_length: int
    token_dim: int
    vocab_size: int
    num_classes: int
    teacher_sha256: str | None = None
    tokenizer_sha256: str | None = None  # the codebook the flow map used must be the student's

    @classmethod
    def of_family(cls, family: Any, teacher_sha256: str | None = None,
                  tokenizer_sha256: str | None = None) -> "PairExpectation":
        """What a family's student trains on: its sequence length, token dimension, codebook size and classes."""
        return cls(family.sequence_length, family.token_dim, int(family.codebook().shape[0]), family.num_classes,
                   teacher_sha256=teacher_sha256, tokenizer_sha256=tokenizer_sha256)


def validate_manifest(manifest: Mapping[str, Any], expected: PairExpectation, directory: Path) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PairFormatError(f"{directory}: pair format {manifest.get('format_version')} != {FORMAT_VERSION}")
    checks = {"sequence_length": expected.sequence_length, "token_dim": expected.token_dim,
              "vocab_size": expected.vocab_size, "num_classes": expected.num_classes}
    wrong = {k: (manifest.get(k), v) for k, v in checks.items() if manifest.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} pairs={a} model={b}" for k, (a, b) in wrong.items())
        raise PairFormatError(f"pairs in {directory} do not match the model ({detail}): they were generated for "
                              f"preset {manifest.get('teacher', {}).get('preset')!r}. Use the same model preset.")
    teacher_sha = manifest.get("teacher", {}).get("sha256")
    if expected.teacher_sha256 and teacher_sha and teacher_sha != expected.teacher_sha256:
        raise PairFormatError(f"pairs in {directory} come from a different teacher (sha256 {teacher_sha[:12]} vs "
                              f"{expected.teacher_sha256[:12]}); the student must be initialised from the same teacher.")
    tokenizer_sha = (manifest.get("tokenizer") or {}).get("sha256")
    if expected.tokenizer_sha256 and tokenizer_sha and tokenizer_sha != expected.tokenizer_sha256:
        raise PairFormatError(f"pairs in {directory} were mapped with a different tokenizer (sha256 {tokenizer_sha[:12]} "
                              f"vs {expected.tokenizer_sha256[:12]}): the flow map's noise -> token pairs depend on its "
                              "codebook. Train with the tokenizer the pairs were generated with, or regenerate them.")
    if not manifest.get("complete", False):
        raise PairFormatError(f"pair generation in {directory} is incomplete; re-run the same generate_pairs command "
                              f"to finish it (complete shards are skipped).")


class PairDataset(Dataset):
    """All pairs of a directory as items ``{"label", "indices" (L,), "noise" (L, d), "sample_id"}``.

    ``sample_filter`` (e.g. ``lambda i: i % 20 != 0``) selects a split by sample id. Noise is regenerated from the
    seed and checked against the stored sum.
    """

    def __init__(self, directory: str | Path, expected: PairExpectation, sample_filter=None,
                 verify_checksums: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        validate_manifest(self.manifest, expected, self.directory)
        self.token_shape = (expected.sequence_length, expected.token_dim)
        columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("sample_ids", "seeds", "labels", "indices",
                                                                  "noise_sum")}
        for entry in self.manifest["shards"]:
            path = self.directory / entry["file"]
            if verify_checksums and file_sha256(path) != entry["sha256"]:
                raise PairFormatError(f"{path} does not match the checksum in the manifest (corrupt or modified); "
                                      f"delete it and re-run generate_pairs to regenerate it.")
            shard = read_shard(path)
            for key in columns:
                columns[key].append(shard[key])
        data = {k: torch.cat(v) for k, v in columns.items()}
        keep = torch.ones_like(data["sample_ids"], dtype=torch.bool)
        if sample_filter is not None:
            keep = torch.tensor([bool(sample_filter(int(i))) for i in data["sample_ids"]], dtype=torch.bool)
        self.data = {k: v[keep] for k, v in data.items()}
        if self.data["indices"].shape[1:] != (expected.sequence_length,):
            raise PairFormatError(f"shards hold sequences of shape {tuple(self.data['indices'].shape[1:])}, "
                                  f"expected ({expected.sequence_length},)")

    def __len__(self) -> int:
        return int(self.data["sample_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seed = int(self.data["seeds"][i])
        noise = per_sample_normal([seed], self.token_shape)[0]
        if noise_sums(noise[None])[0] != self.data["noise_sum"][i]:
            raise PairFormatError(f"noise regenerated from seed {seed} does not match the stored checksum: this "
                                  f"torch version draws different random numbers than the one that generated the "
                                  f"pairs. Regenerate the pairs with this torch version, or train with the one that generated them.")
        return {"label": self.data["labels"][i], "indices": self.data["indices"][i].long(), "noise": noise,
                "sample_id": self.data["sample_ids"][i]}
