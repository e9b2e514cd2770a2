"""``python -m dd.generate_pairs model=<preset> num_pairs=N``: (noise, tokens) pairs from the teacher via flow matching.

Re-running the same command continues an interrupted run: complete shards are kept, missing ones generated.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dd.pairs.shards import FORMAT_VERSION, check_settings_match, read_manifest, state_dict_sha256, write_manifest
from dd.runs import (
    ConfigError,
    fast_path_from_config,
    flow_from_config,
    is_multirun,
    is_rank_zero,
    refuse_multirun_with_ddp,
    sampling_from_config,
    save_resolved_config,
)

log = logging.getLogger("dd.generate_pairs")


def _validate(cfg: dict[str, Any]) -> None:
    for key in ("num_pairs", "shard_size", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if int(cfg["seed_base"]) < 0:
        raise ConfigError(f"seed_base={cfg['seed_base']} must be >= 0")
    sampling_from_config(cfg["model"]["sampling"])
    flow_from_config(cfg["flow"])
    fast_path_from_config(cfg.get("fast_path", "eager"), cfg["trainer"])
    refuse_multirun_with_ddp(cfg["trainer"], is_multirun())


def _settings(cfg: dict[str, Any], spec: Any, family: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "task": "generate_pairs",
        "family": spec.family,
        "teacher": {"preset": spec.name, "checkpoint": spec.teacher.checkpoint,
                    "sha256": state_dict_sha256(family.teacher)},
        "tokenizer": {"checkpoint": spec.tokenizer.checkpoint, "sha256": state_dict_sha256(family.tokenizer)},
        "sequence_length": family.sequence_length,
        "token_dim": family.token_dim,
        "vocab_size": int(family.codebook().shape[0]),
        "num_classes": family.num_classes,
        "sampling": dict(cfg["model"]["sampling"]),
        "flow": dict(cfg["flow"]),
        "fast_path": cfg.get("fast_path", "eager"),  # execution only (same pairs): not compared on resume
        "seed_base": int(cfg["seed_base"]),
        "labels": cfg["labels"],
        "num_pairs": int(cfg["num_pairs"]),
        "shard_size": int(cfg["shard_size"]),
        "store_noise": bool(cfg["store_noise"]),
        "noise": "per-sample seed: dd.sampling.seeds.per_sample_normal([seed], (L, d)), CPU float32",
        "seed_range": [int(cfg["seed_base"]), int(cfg["seed_base"]) + int(cfg["num_pairs"]) - 1],
        "torch_version": torch.__version__,
    }


def _prepare_directory(directory: Path, settings: dict[str, Any]) -> None:
    """Create the manifest, or check that an existing one was written with the same settings."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "manifest.json").is_file():
        existing = read_manifest(directory)
        check_settings_match(existing, settings)
        if not is_rank_zero():
            return
        settings = {**existing, "resumed_at": dt.datetime.now().isoformat(timespec="seconds")}
    elif not is_rank_zero():
        return
    for stale in directory.glob("*.tmp*"):  # left by a run killed mid-write; the shard itself will be redone
        stale.unlink(missing_ok=True)
    settings.setdefault("created_at", dt.datetime.now().isoformat(timespec="seconds"))
    settings.setdefault("shards", [])
    settings["complete"] = False
    write_manifest(directory, settings)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Generate the pairs described by a resolved config; returns the final manifest."""
    import lightning as L
    from hydra.utils import instantiate

    from dd.tasks.pair_generation import PairGenerationTask, ShardWriter, finalize_manifest, pending_shards

    _validate(cfg)
    directory = Path(cfg["output_dir"]) / "pairs"
    spec = instantiate(cfg["model"], _convert_="all")
    family = spec.build_family()
    family.set_fast_path(cfg.get("fast_path", "eager"))
    settings = _settings(cfg, spec, family)
    _prepare_directory(directory, settings)
    if is_rank_zero():
        save_resolved_config(Path(cfg["output_dir"]), cfg)
    num_pairs, shard_size = int(cfg["num_pairs"]), int(cfg["shard_size"])
    todo = pending_shards(directory, num_pairs, shard_size)
    log.info("%d of %d shards to generate in %s", len(todo), -(-num_pairs // shard_size), directory)
    if not todo:
        return finalize_manifest(directory, num_pairs, shard_size) if is_rank_zero() else read_manifest(directory)
    task = PairGenerationTask(family, sampling_from_config(cfg["model"]["sampling"]), flow_from_config(cfg["flow"]),
                              int(cfg["seed_base"]), cfg["labels"], int(cfg["batch_size"]), todo)
    writer = ShardWriter(directory, (family.sequence_length, family.token_dim), bool(cfg["store_noise"]), todo,
                         finalize=lambda d: finalize_manifest(d, num_pairs, shard_size))
    trainer = L.Trainer(**cfg["trainer"], logger=False, callbacks=[writer], enable_progress_bar=False,
                        use_distributed_sampler=False, enable_checkpointing=False)
    trainer.predict(task, return_predictions=False)
    return read_manifest(directory)


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate_pairs")
def main(cfg: DictConfig) -> None:
    from dd.runs import exit_cleanly_on_expected_errors

    with exit_cleanly_on_expected_errors("dd.generate_pairs"):
        manifest = run(OmegaConf.to_container(cfg, resolve=True))
    if is_rank_zero():
        log.info("pairs: %d/%d written, complete=%s", manifest.get("num_written", 0), manifest["num_pairs"],
                 manifest.get("complete"))


if __name__ == "__main__":
    main()
