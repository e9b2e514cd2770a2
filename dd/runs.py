"""Run bookkeeping shared by the three entry points: config conversion, early validation, run directories.

No Lightning import here; Hydra/OmegaConf only through plain containers handed in by the entry points.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from dd.flow import FlowMapConfig
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
    except (TypeError, ValueError) as err:
        raise ConfigError(f"flow: {err}") from err


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
