"""Run bookkeeping shared by the three entry points: config conversion, early validation, run directories.

No Lightning import here; Hydra/OmegaConf only through plain containers handed in by the entry points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dd.acceleration import FastPathError, check_fast_path, require_cuda_graphs
from dd.checkpoint import CheckpointError
from dd.flow import FlowMapConfig
from dd.pairs.shards import PairFormatError
from dd.sampling.logits import SamplingConfig


class ConfigError(ValueError):
    """A setting is impossible; raised before any model is loaded."""


def sampling_from_config(cfg: dict[str, Any]) -> SamplingConfig:
    try:
        return SamplingConfig(**cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.sampling: {err}") from err


def flow_from_config(cfg: dict[str, Any]) -> FlowMapConfig:
    try:
        return FlowMapConfig(**cfg)
    except (TypeError, ValueError, FastPathError) as err:
        raise ConfigError(f"flow: {err}") from err


def fast_path_from_config(fast_path: Any, trainer_cfg: dict[str, Any], key: str = "fast_path") -> str:
    """A ``fast_path`` setting (:data:`dd.acceleration.FAST_PATHS`), checked before any model is loaded:
    ``cuda_graph`` needs CUDA and a GPU run (``hardware=gpu`` / ``gpu_fp32``)."""
    try:
        fast_path = check_fast_path(fast_path)
        if fast_path == "cuda_graph":
            if trainer_cfg.get("accelerator") == "cpu":
                raise FastPathError("fast_path='cuda_graph' captures CUDA graphs, but trainer.accelerator=cpu; run "
                                    "with hardware=gpu (or gpu_fp32), or use fast_path=compile or eager")
            require_cuda_graphs()
    except (ValueError, FastPathError) as err:
        raise ConfigError(f"{key}: {err}") from err
    return fast_path


def refuse_multirun_with_ddp(trainer_cfg: dict[str, Any], is_multirun: bool) -> None:
    """Hydra multirun + multi-device DDP re-runs the whole sweep on every rank: refuse it with a way out."""
    devices = trainer_cfg.get("devices", 1)
    multi = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1) \
        or devices in ("auto", -1) or int(trainer_cfg.get("num_nodes", 1)) > 1
    if is_multirun and multi:
        raise ConfigError("Hydra multirun (-m) with multi-device DDP is not supported: every rank would re-run the "
                          "whole sweep. Run sweep jobs with trainer.devices=1, or run each multi-device job "
                          "separately without -m.")


def is_multirun() -> bool:
    return any(arg in ("-m", "--multirun") for arg in sys.argv[1:])


def is_rank_zero() -> bool:
    """True in the launching process (rank 0) before Lightning has set up distributed state."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def save_resolved_config(directory: Path, cfg: dict[str, Any], name: str = "config.json") -> Path:
    """Store the resolved config as plain JSON next to the artifacts."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return path


#: What a user fixes from the message alone (a setting, a missing, corrupt or mismatched file, weights not available
#: offline): the entry points print these as one line. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, PairFormatError, FileNotFoundError)


@contextlib.contextmanager
def exit_cleanly_on_expected_errors(prog: str) -> Iterator[None]:
    """Run an entry point's body; an :data:`EXPECTED_ERRORS` error ends the process with exit status 1 and the single
    line ``<prog>: <message>`` on stderr (the run's log files get it too), instead of a traceback."""
    try:
        yield
    except EXPECTED_ERRORS as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        _log_to_files(logging.getLogger(prog), f"{type(err).__name__}: {message}")
        sys.exit(f"{prog}: {message}")


def _log_to_files(logger: logging.Logger, message: str) -> None:
    """Record an error in the run's log files only: on the console it would repeat the exit line."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Ranks a trainer config asks for (devices as a count or a list; other values, e.g. "auto", count as one)."""
    devices = trainer_cfg.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    nodes = trainer_cfg.get("num_nodes", 1)
    return max(count, 1) * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
