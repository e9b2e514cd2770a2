"""``python -m dd.train [model=gpt_tiny] [trainer.devices=8] [resume=auto]``: train a DD student on pairs.

The student is initialised from the teacher (official DD semantics); the EMA student is exported in the official
LlamaGen-DD layout at the end (``<output_dir>/export/student_ema.pt``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dd.distill.losses import LossConfig
from dd.runs import (ConfigError, is_multirun, is_rank_zero, refuse_multirun_with_ddp, save_resolved_config,
                     world_size)
from dd.sampling.dd_samplers import validate_split, validate_t_list

log = logging.getLogger("dd.train")


def _validate(cfg: dict[str, Any], spec: Any) -> None:
    try:
        validate_t_list(cfg["schedule"]["t_list"], spec.num_timesteps)
        validate_split(cfg["schedule"]["split_t"], spec.num_timesteps)
        LossConfig(**{k: v for k, v in cfg["loss"].items() if k != "perceptual"}, split_t=cfg["schedule"]["split_t"]
                   ).check_t_list(cfg["schedule"]["t_list"])
    except ValueError as err:
        raise ConfigError(f"model={spec.name} (timesteps in {spec.timestep_unit}, 0..{spec.num_timesteps}): {err}"
                          ) from err
    if int(cfg["max_steps"]) < 1 or int(cfg["batch_size"]) < 1:
        raise ConfigError("max_steps and batch_size must be >= 1")
    if _method(cfg) == "dd":
        from dd.tasks.distillation import OptimConfig

        try:
            OptimConfig(**cfg["optim"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"optim: {err}") from err
    if int(cfg.get("snapshot_every", 0)) < 0:
        raise ConfigError(f"snapshot_every={cfg['snapshot_every']} must be >= 0 (0: no snapshots)")
    if int(cfg["data"]["val_every"]) < 2:
        raise ConfigError(f"data.val_every={cfg['data']['val_every']} must be >= 2 (every k-th pair is held out)")
    if cfg["resume"] not in ("auto", "never") and not Path(str(cfg["resume"])).is_file():
        raise ConfigError(f"resume={cfg['resume']!r}: expected 'auto', 'never' or an existing .ckpt path")
    refuse_multirun_with_ddp(cfg["trainer"], is_multirun())
    if _method(cfg) not in ("dd", "dd2"):
        raise ConfigError(f"method={_method(cfg)!r}: expected dd (pair regression) or dd2 (score distillation)")
    if _method(cfg) == "dd2":
        from dd.tasks.dd2 import dd2_config

        try:
            dd2_config(cfg["method"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"method=dd2: {err}") from err
        precision = str(cfg["trainer"].get("precision", "32-true"))
        if precision.startswith("16") or precision == "half":
            raise ConfigError(f"method=dd2 with trainer.precision={precision}: DD2 steps its two optimisers itself, "
                              "outside fp16's loss scaling (gradients would be clipped while still scaled, and an "
                              "overflow would reach Adam). Use trainer.precision=bf16-mixed (hardware=gpu) or 32-true")
        if int(cfg.get("accumulate_grad_batches", 1)) != 1:
            raise ConfigError(f"method=dd2 updates its two networks itself once per batch, so "
                              f"accumulate_grad_batches={cfg['accumulate_grad_batches']} cannot apply: set "
                              "accumulate_grad_batches=1 and raise batch_size (or trainer.devices) instead")


def _method(cfg: dict[str, Any]) -> str:
    return str((cfg.get("method") or {}).get("name", "dd"))


def validation_split(labels: Any, num_classes: int, every: int) -> Callable[[int], bool]:
    """Which sample ids are held out for validation, one in ``every``. With seeded (uniform) labels every
    ``every``-th id; with labels that cycle over the sample id (``balanced``: id mod num_classes, or a list of
    classes) every ``every``-th block of one whole cycle, so validation sees every class (every ``every``-th id
    would see only the classes that share a factor with ``every``: class 0 alone for 10 classes and every 20)."""
    if labels == "uniform":
        return lambda i: i % every == 0
    period = num_classes if labels == "balanced" else len(labels)
    return lambda i: (i // period) % every == 0


def _datasets(cfg: dict[str, Any], family: Any, teacher_sha: str):
    from dd.pairs import PairDataset, PairExpectation, state_dict_sha256
    from dd.pairs.shards import read_manifest

    expect = PairExpectation.of_family(family, teacher_sha256=teacher_sha,
                                       tokenizer_sha256=state_dict_sha256(family.tokenizer))
    every = int(cfg["data"]["val_every"])
    directory = Path(cfg["data"]["pairs_dir"])
    if not (directory / "manifest.json").is_file():
        raise ConfigError(f"no pairs at {directory}. Generate them first: python -m dd.generate_pairs "
                          f"model={cfg['model']['name']} (or set data.pairs_dir=<.../pairs>).")
    held_out = validation_split(read_manifest(directory).get("labels", "uniform"), family.num_classes, every)
    train = PairDataset(directory, expect, sample_filter=lambda i: not held_out(i))
    val = PairDataset(directory, expect, sample_filter=held_out)
    world = world_size(cfg["trainer"])
    if len(train) < int(cfg["batch_size"]) * world:
        raise ConfigError(f"only {len(train)} training pairs for batch_size={cfg['batch_size']} on {world} rank(s) "
                          f"({int(cfg['batch_size']) * world} per step): generate more pairs or lower batch_size")
    return train, val


def _training_seed_range(cfg: dict[str, Any], task: Any) -> list[int] | None:
    """The per-sample seeds whose noise the student trained on: the pairs' (their manifest's ``seed_range``), or a
    pair-free DD2 run's own draws. ``dd.eval`` warns when an evaluation's seeds fall inside."""
    from dd.pairs.shards import MANIFEST, read_manifest

    data = getattr(task, "train_data", None)
    if hasattr(data, "seed_base") and hasattr(data, "num_items"):  # pair-free noise (DD2)
        return [int(data.seed_base), int(data.seed_base) + int(data.num_items) - 1]
    pairs = Path(cfg["data"]["pairs_dir"])
    return read_manifest(pairs).get("seed_range") if (pairs / MANIFEST).is_file() else None


def _perceptual(cfg: dict[str, Any], family: Any):
    weight = float(cfg["loss"].get("perceptual_weight", 0.0))
    if weight <= 0:
        return None
    from dd.distill.losses import FeaturePerceptualLoss
    from dd.distill.perceptual import load_perceptual_network

    return FeaturePerceptualLoss(family, load_perceptual_network(cfg["loss"]["perceptual"]))


def _logger(cfg: dict[str, Any], out: Path):
    """The run's logger, its wandb run already started: no login or no network fails here, before training."""
    from dd.tasks.loggers import make_logger, start_logger

    try:
        logger = make_logger(cfg["logger"], out, cfg["run_name"], job_type="train")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    start_logger(logger, cfg["logger"]["name"])
    return logger or False


def _sample_grids(cfg: dict[str, Any], family: Any, val: Any):
    """Student sample grids at validation for loggers that show images (wandb); idle with csv / none."""
    from dd.tasks.sample_grids import StudentSampleGrids

    return StudentSampleGrids(family, val, cfg["schedule"]["t_list"], cfg["schedule"]["split_t"],
                              num_images=int(cfg.get("sample_grid_images", 8)))


#: settings that decide what a run trains: resume=auto refuses to continue a checkpoint written with others
#: (``max_steps`` may change: a run can be extended; logging, validation and checkpoint intervals may too)
RUN_DEFINING = ("model", "method", "schedule", "loss", "optim", "data", "seed", "batch_size",
                "accumulate_grad_batches", "grad_clip", "ema_decay", "student_init", "trainer.devices",
                "trainer.num_nodes")


def _run_defining(cfg: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RUN_DEFINING` settings of a (resolved or saved) config, by dotted name."""
    picked = {}
    for name in RUN_DEFINING:
        value: Any = cfg
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        picked[name] = value
    return picked


def check_resume_settings(cfg: dict[str, Any], out: Path) -> None:
    """resume=auto over an existing checkpoint: the run's saved settings (``<out>/config.json``) must match the new
    ones in everything that decides what is trained (:data:`RUN_DEFINING`), or the checkpoint would silently be
    continued with another recipe. A changed ``max_steps`` is allowed (extending a run) and logged."""
    from dd.evaluation.resume import differences

    saved_path = out / "config.json"
    if cfg["resume"] != "auto" or not (out / "checkpoints" / "last.ckpt").is_file() or not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: resuming without checking the run's settings", saved_path)
        return
    changed = differences(_run_defining(saved), _run_defining(cfg))
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"{out / 'checkpoints' / 'last.ckpt'} belongs to a run with other settings ({shown}), so "
                          "resume=auto would continue it with a different recipe. Start that folder over with "
                          "resume=never (its checkpoints move to checkpoints.previous), pick another output_dir, or "
                          "drop the changed settings to continue the run")
    if saved.get("max_steps") != cfg["max_steps"]:
        log.warning("resuming %s with max_steps=%s instead of the run's %s: learning-rate schedules that span "
                    "max_steps change from the checkpoint on", out / "checkpoints" / "last.ckpt", cfg["max_steps"],
                    saved.get("max_steps"))


def set_aside_checkpoints(ckpt_dir: Path) -> Path | None:
    """resume=never over a folder with checkpoints: move them to ``checkpoints.previous`` (replacing an older one) so
    the new run's ``last.ckpt`` is its own (Lightning would otherwise write ``last-v1.ckpt`` beside the old one, and a
    later resume=auto would continue the old run under the new run's config.json). Returns where they went."""
    if not ckpt_dir.is_dir() or not any(ckpt_dir.glob("*.ckpt")):
        return None
    previous = ckpt_dir.with_name(ckpt_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    ckpt_dir.rename(previous)
    return previous


def _resume_path(cfg: dict[str, Any], ckpt_dir: Path) -> str | None:
    if cfg["resume"] == "never":
        return None
    if cfg["resume"] == "auto":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(cfg["resume"])


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train according to a resolved config; returns a summary (export path, last validation metrics)."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dd.distill.ema import export_student
    from dd.pairs import state_dict_sha256
    from dd.tasks.curves import TrainingCurves
    from dd.tasks.distillation import DistillationTask, OptimConfig
    from dd.tasks.loggers import close_logger
    from dd.tasks.progress import training_progress_callbacks
    from dd.tasks.snapshots import StudentSnapshots

    spec = instantiate(cfg["model"], _convert_="all")
    _validate(cfg, spec)
    out = Path(cfg["output_dir"])
    check_resume_settings(cfg, out)  # before anything is built, and before this run's settings replace the saved ones
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)  # no "Seed set" line before an error line
    family = spec.build_family()
    teacher_sha = state_dict_sha256(family.teacher)  # hashed once: pair checks and every export
    dd2 = _method(cfg) == "dd2"
    if dd2:  # conditional score distillation: no pairs (dd.tasks.dd2)
        from dd.tasks.dd2 import build_dd2_task, dd2_config, export_schedule

        pairs = _datasets(cfg, family, teacher_sha) \
            if dd2_config(cfg["method"]).dd_weight > 0 else None  # DD + DD2: regression on pairs too
        task, schedule = build_dd2_task(cfg, spec, family, pairs), export_schedule(cfg, spec)
    else:
        student = spec.build_student(family.codebook(), init=cfg["student_init"], teacher=family.teacher)
        train, val = _datasets(cfg, family, teacher_sha)
        loss = LossConfig(**{k: v for k, v in cfg["loss"].items() if k != "perceptual"},
                          split_t=cfg["schedule"]["split_t"])
        task = DistillationTask(student, cfg["schedule"]["t_list"], loss, OptimConfig(**cfg["optim"]),
                                float(cfg["ema_decay"]), int(cfg["max_steps"]), train, val, int(cfg["batch_size"]),
                                int(cfg["num_workers"]), _perceptual(cfg, family), bool(cfg["compile"]),
                                int(cfg["seed"]))
        schedule = cfg["schedule"]
    logger = _logger(cfg, out)
    ckpt_dir = out / "checkpoints"
    if is_rank_zero():
        save_resolved_config(out, cfg)
        if cfg["resume"] == "never" and (moved := set_aside_checkpoints(ckpt_dir)) is not None:
            log.warning("resume=never: the folder's earlier checkpoints were moved to %s", moved)
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=int(cfg["ckpt_every"]),
                                 save_top_k=0)
    progress = training_progress_callbacks(cfg["trainer"])  # summary lines instead of a bar when not on a terminal

    def export(path: Path, task: Any, extra: dict[str, Any]) -> Path:
        return export_student(path, task.ema.shadow.state_dict(), task.student.state_dict(),
                              {"model": cfg["model"], "schedule": schedule, "method": _method(cfg),
                               "teacher_sha256": teacher_sha, **extra}, keys=spec.export_keys)

    snapshots = StudentSnapshots(out / "export", int(cfg.get("snapshot_every", 0)), export)
    trainer_cfg = dict(cfg["trainer"])
    if dd2 and world_size(trainer_cfg) > 1 and trainer_cfg.get("strategy", "auto") in ("auto", "ddp"):
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"  # each DD2 update leaves one network unused
    trainer = L.Trainer(**trainer_cfg, use_distributed_sampler=False, max_steps=int(cfg["max_steps"]), logger=logger,
                        callbacks=[checkpoint, *progress, *([] if dd2 else [_sample_grids(cfg, family, val)]), snapshots,
                                   TrainingCurves(out, title=str(cfg["run_name"]))],  # <out>/logs/curves.png
                        val_check_interval=int(cfg["val_every_steps"]),
                        check_val_every_n_epoch=None,
                        log_every_n_steps=int(cfg["log_every"]), default_root_dir=str(out),
                        gradient_clip_val=None if dd2 else float(cfg["grad_clip"]),  # DD2 clips its own
                        accumulate_grad_batches=int(cfg["accumulate_grad_batches"]),
                        limit_val_batches=cfg["limit_val_batches"], num_sanity_val_steps=0)
    if not dd2 and int(cfg["optim"].get("warmup_steps", 0)) >= int(cfg["max_steps"]):  # past every config error
        log.warning("optim.warmup_steps=%s >= max_steps=%s: the learning rate never reaches optim.lr and never "
                    "decays; lower optim.warmup_steps", cfg["optim"]["warmup_steps"], cfg["max_steps"])
    trainer.fit(task, ckpt_path=_resume_path(cfg, ckpt_dir))
    close_logger(trainer.logger)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary: dict[str, Any] = {"global_step": trainer.global_step, "metrics": metrics}
    if trainer.is_global_zero:
        final = export(out / "export" / "student_ema.pt", task,
                       {"global_step": trainer.global_step, "train_s": round(snapshots.elapsed(), 3),
                        "metrics": metrics, "training_seed_range": _training_seed_range(cfg, task)})
        summary["export"] = str(final)
        log.info("exported EMA student to %s", final)
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from dd.runs import exit_cleanly_on_expected_errors

    os.environ.setdefault("WANDB_SILENT", "true")
    with exit_cleanly_on_expected_errors("dd.train"):
        summary = run(OmegaConf.to_container(cfg, resolve=True))
    if is_rank_zero():
        log.info("done: step %s, %s", summary["global_step"], summary["metrics"])


if __name__ == "__main__":
    main()
