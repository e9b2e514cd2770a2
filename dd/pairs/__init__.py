"""Pair generation (teacher + flow map) and the pair shard format."""

from dd.pairs.generation import FlowChooser, PairBatch, generate_pair_batch, make_labels
from dd.pairs.shards import (
    FORMAT_VERSION,
    PairDataset,
    PairExpectation,
    PairFormatError,
    read_manifest,
    shard_ranges,
    state_dict_sha256,
)

__all__ = [
    "FORMAT_VERSION",
    "FlowChooser",
    "PairBatch",
    "PairDataset",
    "PairExpectation",
    "PairFormatError",
    "generate_pair_batch",
    "make_labels",
    "read_manifest",
    "shard_ranges",
    "state_dict_sha256",
]
