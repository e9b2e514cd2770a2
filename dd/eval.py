"""``python -m dd.eval sampler=<fewstep|teacher_involved|teacher> ...``: sample, decode, write and score images.

Every impossible setting (t_list, split_t, teacher_start_t, sample counts, label mode, missing student checkpoint,
missing reference statistics or extractor weights) fails with a :class:`~dd.runs.ConfigError` before any model is
loaded. Sampling runs through ``Trainer.predict`` (``trainer.devices=N`` shards the sample indices over N devices
with identical results); rank 0 then writes ``samples.npz``, ``grid.png`` and ``metrics.json``
(see :mod:`dd.evaluation.outputs`).

Re-running the same command resumes (``resume=auto``, :mod:`dd.evaluation.resume`): finished batches are kept, only
the missing sample ranges are sampled, and the metrics are recomputed. ``num_samples`` may grow (the kept samples
stay, only the new indices are sampled); a smaller one, or a folder made with other settings or weights, is refused
unless ``resume=never`` asks to start over.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dd.evaluation.quality import FMNIST_EXTRACTOR, MetricPlan, resolve_metric_plan
from dd.evaluation.resume import RESUME_MODES, ResumeMismatchError
from dd.evaluation.samplers import EvalModels, EvalSampler
from dd.runs import (
    ConfigError,
    fast_path_from_config,
    is_multirun,
    is_rank_zero,
    refuse_multirun_with_ddp,
    save_resolved_config,
)

log = logging.getLogger("dd.eval")
#: configs/eval.yaml's seed_base: past the seeds dd.generate_pairs (seed_base 0) and DD2's training draw
EVAL_SEED_BASE = 3_000_000_000

EXPORT_HINT = ("train and export one with `python -m dd.generate_pairs model={name}` followed by "
               "`python -m dd.train model={name}` (the export lands at outputs/train/{name}/export/student_ema.pt)")
_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- validation (no model is loaded here) ----------------------------------------------------------------------
def _check_counts(cfg: dict[str, Any]) -> None:
    for key in ("num_samples", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    if int(cfg["seed_base"]) < 0:
        raise ConfigError(f"seed_base={cfg['seed_base']} must be >= 0")
    if cfg.get("float32_matmul_precision", "highest") not in ("highest", "high", "medium"):
        raise ConfigError(f"float32_matmul_precision={cfg['float32_matmul_precision']!r}: highest, high or medium")
    for key in ("teacher_dtype", "student_dtype"):
        if cfg.get(key) not in _DTYPES:
            raise ConfigError(f"{key}={cfg.get(key)!r}: choose null, float32, bfloat16 or float16")
    if cfg.get("resume", "auto") not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.get('resume')!r}: choose {' or '.join(RESUME_MODES)}")
    logger = cfg.get("logger", {}).get("name", "none")
    if logger not in ("csv", "wandb", "none"):
        raise ConfigError(f"logger={logger!r}: choose none, csv or wandb")
    fast_path_from_config(cfg.get("fast_path", "eager"), cfg["trainer"])


def _check_labels(mode: Any, num_classes: int) -> None:
    if mode in ("uniform", "balanced"):
        return
    def is_class(c: Any) -> bool:
        return isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes

    if not isinstance(mode, (list, tuple)) or not mode or not all(is_class(c) for c in mode):
        raise ConfigError(f"labels={mode!r}: expected uniform, balanced or a list of class ids in 0..{num_classes - 1}")


def training_seed_overlap(reference: str, seed_base: int, num_samples: int) -> tuple[int, int] | None:
    """The seeds [first, last] that an evaluation of ``num_samples`` from ``seed_base`` shares with the noise the
    student was trained on (``training_seed_range`` in a dd export's ``.json`` sidecar), or None."""
    sidecar = Path(str(reference) + ".json").expanduser()
    if "://" in str(reference) or not sidecar.is_file():
        return None
    try:
        trained = json.loads(sidecar.read_text()).get("training_seed_range")
    except ValueError:
        return None
    if not trained:
        return None
    first, last = max(seed_base, int(trained[0])), min(seed_base + num_samples - 1, int(trained[1]))
    return (first, last) if first <= last else None


def _warn_on_training_seeds(reference: str, seed_base: int, num_samples: int) -> None:
    overlap = training_seed_overlap(reference, seed_base, num_samples)
    if overlap is not None:
        log.warning("seeds %d..%d of this evaluation are the student's training noise (%s.json, "
                    "training_seed_range): its samples there are fits, not generations, and flatter the metrics. "
                    "Pass a seed_base past the training seeds (the default, %d, is)", overlap[0], overlap[1],
                    reference, EVAL_SEED_BASE)


def sequence_layout(spec: Any) -> tuple[int, int, int]:
    """(num_timesteps, sequence_length, num_classes) of a preset, read from its YAML (nothing is built)."""
    return spec.num_timesteps, spec.sequence_length, spec.num_classes


def _build_sampler(cfg: dict[str, Any], spec: Any) -> EvalSampler:
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    num_timesteps, sequence_length, _ = sequence_layout(spec)
    kind = getattr(get_class(cfg["sampler"]["_target_"]), "kind", cfg["sampler"]["_target_"])
    try:
        sampler = instantiate(cfg["sampler"], _convert_="all")
        sampler.validate(num_timesteps, sequence_length)
    except (TypeError, ValueError, InstantiationException) as err:
        raise ConfigError(f"sampler={kind} on model={spec.name} ({num_timesteps} timesteps counted in "
                          f"{spec.timestep_unit}, {sequence_length} tokens): {err}") from err
    return sampler


def student_reference(cfg: dict[str, Any], spec: Any) -> str:
    """The student checkpoint to load; a local file must exist (checked before anything is loaded)."""
    reference = cfg["student"]["checkpoint"]
    if reference == "preset":
        reference = spec.student.checkpoint
        if reference is None:
            raise ConfigError(f"student.checkpoint=preset, but preset {spec.name} names no student checkpoint; "
                              + EXPORT_HINT.format(name=spec.name))
    reference = str(reference)
    if reference.startswith(("hf://", "random:")):
        return reference
    if not Path(reference).expanduser().is_file():
        raise ConfigError(f"student checkpoint {reference} not found. Pass student.checkpoint=<file>, "
                          f"student.checkpoint=preset for the preset's own DD weights, or "
                          + EXPORT_HINT.format(name=spec.name))
    return reference


def validate(cfg: dict[str, Any]) -> tuple[Any, EvalSampler, MetricPlan]:
    """Build the (weightless) preset spec and the sampler and check every setting; loads no model."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    _check_counts(cfg)
    refuse_multirun_with_ddp(cfg["trainer"], is_multirun())
    try:
        spec = instantiate(cfg["model"], _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"model={cfg['model'].get('name')}: {err}") from err
    _, _, num_classes = sequence_layout(spec)
    _check_labels(cfg["labels"], num_classes)
    sampler = _build_sampler(cfg, spec)
    reference = student_reference(cfg, spec) if sampler.needs_student else None
    try:
        plan = resolve_metric_plan(cfg["metrics"], num_classes)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"metrics: {err}") from err
    if reference is not None:
        _warn_on_training_seeds(reference, int(cfg["seed_base"]), int(cfg["num_samples"]))
    if plan.enabled and cfg["metrics"].get("reference") == "bundled" and num_classes != 10:
        log.warning("metrics.reference=bundled is the Fashion-MNIST test set, unrelated to %d-class model %s: pass "
                    "metrics.reference=<statistic.pth> (the DD ImageNet-256 statistics) for a meaningful FID",
                    num_classes, spec.name)
    return spec, sampler, plan


# -- models ----------------------------------------------------------------------------------------------------
def build_models(cfg: dict[str, Any], spec: Any, sampler: EvalSampler) -> EvalModels:
    """Tokenizer, teacher (weights only when the sampler runs it; otherwise a shape-only meta module) and student."""
    dtype = _DTYPES[cfg.get("teacher_dtype")]
    family = spec.build_family(teacher_dtype=dtype, load_teacher=sampler.needs_teacher)
    fast_path = cfg.get("fast_path", "eager")
    family.set_fast_path(fast_path)
    student = None
    if sampler.needs_student:
        student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=student_reference(cfg, spec),
                                     checkpoint_key=cfg["student"].get("checkpoint_key")).eval()
        student.set_fast_path(fast_path, dtype=_DTYPES[cfg.get("student_dtype")])
    return EvalModels(family, student)


def checksums(cfg: dict[str, Any], spec: Any, models: EvalModels, sampler: EvalSampler) -> dict[str, Any]:
    """File and weight checksums of everything that shaped the samples."""
    from dd.checkpoint import state_dict_sha256

    family = models.family
    result: dict[str, Any] = {"tokenizer": {"checkpoint": spec.tokenizer.checkpoint,
                                            "state_dict_sha256": state_dict_sha256(family.tokenizer)}}
    if sampler.needs_teacher:
        result["teacher"] = {"checkpoint": spec.teacher.checkpoint, "state_dict_sha256": state_dict_sha256(family.teacher)}
    if models.student is not None:
        reference = student_reference(cfg, spec)
        result["student"] = {"checkpoint": reference, "file_sha256": student_file_sha256(reference),
                             "state_dict_sha256": state_dict_sha256(models.student)}
    return result


def student_file_sha256(reference: str) -> str | None:
    """sha256 of the student file a reference names (an hf:// one: the downloaded file, already in the Hub cache
    since the student was loaded from it), so ``dd.push`` can match the evaluation to the export; None for
    ``random:<seed>`` students, which have no file."""
    from dd.checkpoint import file_sha256, resolve_reference

    if reference.startswith("random:"):
        return None
    path = resolve_reference(reference, "student.checkpoint") if reference.startswith("hf://") \
        else Path(reference).expanduser()
    return file_sha256(path) if path.is_file() else None


# -- run -------------------------------------------------------------------------------------------------------
def _class_names(plan: MetricPlan, num_classes: int) -> tuple[str, ...] | None:
    from dd.data.fashion_mnist import FASHION_MNIST_CLASSES

    fmnist = plan.extractor == FMNIST_EXTRACTOR and num_classes == len(FASHION_MNIST_CLASSES)
    return FASHION_MNIST_CLASSES if fmnist else None


def _sample(cfg: dict[str, Any], models: EvalModels, sampler: EvalSampler, out: Path,
            ranges: list[tuple[int, int]]) -> Any:
    """Trainer.predict over the given (first, count) batches of sample indices (none: nothing is run, e.g. a
    finished run being re-scored); returns the trainer."""
    import lightning as L

    from dd.tasks.eval_sampling import EvalSampleWriter, EvalSamplingTask

    task = EvalSamplingTask(models, sampler, int(cfg["seed_base"]), cfg["labels"], ranges)
    writer = EvalSampleWriter(out, bool(cfg.get("write_images", True)), sum(count for _, count in ranges))
    trainer = L.Trainer(**cfg["trainer"], logger=False, callbacks=[writer], enable_progress_bar=False,
                        use_distributed_sampler=False, enable_checkpointing=False, enable_model_summary=False)
    if ranges:
        trainer.predict(task, return_predictions=False)
    return trainer


# -- resuming ----------------------------------------------------------------------------------------------------
def resume_settings(cfg: dict[str, Any], sampler: EvalSampler) -> dict[str, Any]:
    """What determines the samples, compared when a run resumes (``num_samples`` may grow: sample i does not
    depend on it). Not compared: batch size, devices, fast path, images on/off, metrics and grid settings (how
    samples are made, stored or scored, not what they are), and file references (the weights' checksums are compared
    instead, so a moved file still resumes)."""
    model = {key: ({k: v for k, v in value.items() if k not in ("checkpoint", "checkpoint_key")}
                   if isinstance(value, dict) else value) for key, value in cfg["model"].items()}
    return {"model": model, "sampler": sampler.describe(), "num_samples": int(cfg["num_samples"]),
            "seed_base": int(cfg["seed_base"]), "labels": cfg["labels"],
            "numerics": {"precision": cfg["trainer"].get("precision"), "teacher_dtype": cfg.get("teacher_dtype"),
                         "student_dtype": cfg.get("student_dtype"),
                         "float32_matmul_precision": cfg.get("float32_matmul_precision")}}


def _refuse(out: Path, err: ResumeMismatchError) -> ConfigError:
    return ConfigError(f"{out} holds samples of another evaluation ({err}). Re-running keeps finished samples only "
                       f"when nothing that shapes them changed (num_samples may grow): pass resume=never to discard "
                       f"them and start over, or output_dir=<another folder>")


def _open_state(cfg: dict[str, Any], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, before any model is built: the run state to continue, after checking its settings; a fresh one (old
    outputs cleared) for a new folder or ``resume=never``."""
    from dd.evaluation import outputs, resume

    state = None
    try:
        if cfg.get("resume", "auto") == "auto":
            state = resume.read_state(out)
            if state is not None and not resume.holds_samples(out, state):
                state = None  # stopped before its first batch (e.g. wandb could not start): nothing to keep
            if state is not None:
                resume.check_same(resume.fixed_settings(state["settings"]), resume.fixed_settings(settings),
                                  "settings")
    except ResumeMismatchError as err:
        raise _refuse(out, err) from err
    before = int(state["settings"]["num_samples"]) if state is not None else 0
    if settings["num_samples"] < before:
        raise ConfigError(f"num_samples={settings['num_samples']} is fewer than the {before} samples of the "
                          f"evaluation in {out} (a re-run may add samples, never drop them): pass num_samples="
                          f"{before} or more, output_dir=<another folder>, or resume=never to start over")
    if state is None:
        outputs.clear_outputs(out)  # a new run, a folder from before eval_state.json, or resume=never
        state = resume.new_state(settings)
    resume.remove_partial_writes(out)
    state["sessions"] = int(state.get("sessions", 0)) + 1
    resume.write_state(out, state)
    return state


def _check_weights(out: Path, state: dict[str, Any], sums: dict[str, Any]) -> None:
    """Rank 0, once the models are built: the weights must be those that made the kept samples."""
    from dd.evaluation import resume

    weights = {name: entry["state_dict_sha256"] for name, entry in sums.items()}
    if state["checksums"] is not None:
        try:
            resume.check_same(state["checksums"], weights, "weights (state_dict_sha256)")
        except ResumeMismatchError as err:
            raise _refuse(out, err) from err
    state["checksums"] = weights
    resume.write_state(out, state)


def _take_settings(out: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Rank 0, once every check passed: the run now makes this session's samples (a grown ``num_samples``)."""
    from dd.evaluation import resume

    state.setdefault("finished_samples", resume.finished_samples(out, state))  # a state from before the field
    state["settings"] = settings
    resume.write_state(out, state)


def _pending_ranges(cfg: dict[str, Any], out: Path, state: dict[str, Any] | None) -> list[tuple[int, int]]:
    """The batches still to sample: neither in ``samples.npz`` of a finished session nor in a part file (read from
    disk on every rank: ranks > 0 start after rank 0 prepared the folder and before any rank writes, so all of them
    see the same parts)."""
    from dd.evaluation import resume

    done = resume.done_mask(out, int(cfg["num_samples"]))
    done[:resume.finished_samples(out, state)] = True
    return resume.missing_ranges(done, int(cfg["batch_size"]))


def _report(cfg: dict[str, Any], spec: Any, sampler: EvalSampler, plan: MetricPlan, sums: dict[str, Any],
            assembled: Any, steps: int, quality: dict[str, Any], wall_s: float) -> dict[str, Any]:
    from dd.evaluation.report import fid_proxy_reason, timing_summary

    num_samples, seed_base = int(cfg["num_samples"]), int(cfg["seed_base"])
    num_timesteps, sequence_length, num_classes = sequence_layout(spec)
    proxy = fid_proxy_reason(num_samples, plan.extractor)
    return {
        "task": "eval", "created_at": dt.datetime.now().isoformat(timespec="seconds"),
        "model": {"preset": spec.name, "family": spec.family, "num_timesteps": num_timesteps,
                  "sequence_length": sequence_length, "num_classes": num_classes, "image_size": spec.image_size},
        "sampler": sampler.describe(), "steps": steps,
        "num_samples": num_samples, "batch_size": int(cfg["batch_size"]), "seed_base": seed_base,
        "seed_range": [seed_base, seed_base + num_samples - 1], "labels": cfg["labels"],
        "label_counts": [int((assembled.labels == c).sum()) for c in range(num_classes)],
        "teacher_dtype": cfg.get("teacher_dtype"), "student_dtype": cfg.get("student_dtype"),
        "fast_path": cfg.get("fast_path", "eager"), "trainer": cfg["trainer"], "checksums": sums,
        "reference": {"path": plan.reference, "sha256": plan.reference_sha256,
                      "num_samples": plan.reference_num_samples, "prc_reference": plan.prc_reference},
        "metrics_settings": plan.describe(), "metrics": quality,
        "fid_is_proxy": proxy is not None, "fid_proxy_reason": proxy,
        "timing": timing_summary(assembled.batches) | {"total_wall_s": wall_s},
        "torch_version": torch.__version__,
    }


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the sampler a resolved config describes; returns the metrics.json payload ({} on ranks > 0)."""
    spec, sampler, plan = validate(cfg)
    previous = torch.get_float32_matmul_precision()
    if cfg["trainer"].get("accelerator") != "cpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
    try:
        return _evaluate(cfg, spec, sampler, plan)
    finally:
        torch.set_float32_matmul_precision(previous)


def _collect_samples(cfg: dict[str, Any], out: Path, state: dict[str, Any]) -> Any:
    """Every sample of the run (rank 0): the samples of a finished earlier session (``samples.npz``) followed by
    those of the part files, written to a new ``samples.npz`` when there are parts; the state is marked complete
    with the per-batch records."""
    from dd.evaluation import outputs, resume

    num_samples, seed_base = int(cfg["num_samples"]), int(cfg["seed_base"])
    kept = None
    finished = resume.finished_samples(out, state)
    if finished:
        images, labels = outputs.open_samples_npz(out / outputs.SAMPLES_FILE)
        kept = outputs.AssembledSamples(images[:finished], labels[:finished].astype(np.int64),
                                        np.arange(seed_base, seed_base + finished, dtype=np.int64),
                                        list(state["batches"]))
        if finished == num_samples:
            return kept
    assembled = outputs.assemble_parts(out, num_samples, kept=kept)
    outputs.write_samples_npz(out / outputs.SAMPLES_FILE, assembled.images, assembled.labels)
    state.update(complete=True, finished_samples=num_samples, batches=resume.batch_records(assembled.batches))
    resume.write_state(out, state)
    return assembled


def _evaluate(cfg: dict[str, Any], spec: Any, sampler: EvalSampler, plan: MetricPlan) -> dict[str, Any]:
    from dd.evaluation import outputs, resume
    from dd.evaluation.quality import compute_quality
    from dd.evaluation.report import check_model_evals

    out = Path(cfg["output_dir"])
    settings = resume_settings(cfg, sampler)
    state = _open_state(cfg, out, settings) if is_rank_zero() else None
    models = build_models(cfg, spec, sampler)
    sums = checksums(cfg, spec, models, sampler)
    logger = None
    if state is not None:
        _check_weights(out, state, sums)
        logger = _start_logger(cfg, out)  # no login or no network ends the run here, before any sampling
        _take_settings(out, state, settings)
        save_resolved_config(out, cfg)  # after the checks: a refused run leaves the folder's config as it was
    ranges = _pending_ranges(cfg, out, state or resume.read_state(out))
    if state is not None:
        outputs.remove_images(out, ranges)
    start = time.perf_counter()
    trainer = _sample(cfg, models, sampler, out, ranges)
    wall_s = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    num_timesteps, _, num_classes = sequence_layout(spec)
    assembled = _collect_samples(cfg, out, state)
    steps = check_model_evals(assembled.batches, sampler.steps(num_timesteps))
    if cfg.get("write_images", True):
        outputs.write_missing_pngs(out, assembled.images)  # kept samples of a session run without images
    grid = cfg.get("grid", {})
    outputs.make_grid(assembled.images, assembled.labels, num_classes, _class_names(plan, num_classes),
                      int(grid.get("max_rows", 10)), int(grid.get("per_row", 10))).save(out / outputs.GRID_FILE)
    quality = compute_quality(assembled.images, assembled.labels, plan, trainer.strategy.root_device)
    payload = _report(cfg, spec, sampler, plan, sums, assembled, steps, quality, wall_s)
    payload["resume"] = {"sessions": state["sessions"], "sampled_this_session": sum(count for _, count in ranges)}
    outputs.write_json(out / outputs.METRICS_FILE, payload)
    del assembled
    outputs.remove_intermediates(out)
    _log_to_logger(cfg, out, payload, logger)
    return payload


def _start_logger(cfg: dict[str, Any], out: Path) -> Any:
    """Rank 0: the ``logger=`` logger (None for none), its wandb run started (``dd.tasks.loggers.start_logger``)."""
    from dd.tasks.loggers import make_logger, start_logger

    try:
        logger = make_logger(cfg.get("logger", {"name": "none"}), out, cfg["run_name"], job_type="eval")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    start_logger(logger, cfg.get("logger", {}).get("name"))
    return logger


def _log_to_logger(cfg: dict[str, Any], out: Path, payload: dict[str, Any], logger: Any) -> None:
    """``logger=wandb`` (or csv): the metrics.json numbers and grid.png, next to the files (rank 0)."""
    from PIL import Image

    from dd.evaluation.outputs import GRID_FILE
    from dd.tasks.loggers import abandon_logger, log_eval_results, logging_errors, unavailable_message

    if logger is None:
        return
    try:
        log_eval_results(logger, payload, np.asarray(Image.open(out / GRID_FILE).convert("RGB")))
    except logging_errors() as err:  # the results are on disk: a logger that fails now costs a warning only
        log.warning("results not logged: %s; then re-run the command (it re-scores %s without sampling)",
                    unavailable_message(cfg["logger"]["name"], err), out)
        abandon_logger(logger)


def _log_summary(payload: dict[str, Any]) -> None:
    metrics, timing = payload["metrics"], payload["timing"]
    log.info("%s: %d samples, #Step %d, FID %s%s, label accuracy %s, sampling %.4g s/img, decode %.4g s/img",
             payload["sampler"]["name"], payload["num_samples"], payload["steps"], metrics.get("fid"),
             " (proxy)" if payload["fid_is_proxy"] else "", metrics.get("label_accuracy"),
             timing["sampling_s_per_image"], timing["decode_s_per_image"])


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.output_dir = hydra_cfg.runtime.output_dir  # each sweep job in its own subfolder
    from dd.runs import exit_cleanly_on_expected_errors

    os.environ.setdefault("WANDB_SILENT", "true")
    with exit_cleanly_on_expected_errors("dd.eval"):
        payload = run(OmegaConf.to_container(cfg, resolve=True))
    if payload:
        _log_summary(payload)
        log.info("wrote %s", cfg.output_dir)


if __name__ == "__main__":
    main()
