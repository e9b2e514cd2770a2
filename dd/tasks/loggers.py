"""Experiment loggers of the entry points (``logger=csv|wandb|none``) and what evaluation sends to them.

Training hands the logger to its Trainer; evaluation writes ``metrics.json`` and ``grid.png`` itself and, with
``logger=wandb``, also logs the numbers and the grid so a run can be looked at in the wandb UI. Images go to loggers
that take them (:func:`image_loggers`: those with ``log_image``, i.e. wandb); CSV logs numbers only.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from dd.runs import ConfigError

LOGGER_NAMES = ("csv", "wandb", "none")


def make_logger(cfg: Mapping[str, Any], save_dir: Path, run_name: str, job_type: str) -> Logger | None:
    """The logger a ``configs/logger/*.yaml`` entry describes (None for ``none``). wandb runs offline with
    ``logger.offline=true`` or ``WANDB_MODE=offline`` (a local run folder under ``save_dir``, no network)."""
    kind = cfg["name"]
    if kind == "csv":
        return CSVLogger(str(save_dir), name="logs", version="")
    if kind == "wandb":
        logger = WandbLogger(project=cfg["project"], save_dir=str(save_dir), name=run_name,
                             offline=cfg.get("offline", False), job_type=job_type)
        if logger._wandb_init.get("anonymous") is None:  # wandb warns about the key even when it is None
            logger._wandb_init.pop("anonymous", None)
        return logger
    if kind == "none":
        return None
    raise ValueError(f"logger={kind!r}: expected {', '.join(LOGGER_NAMES)}")


def image_loggers(loggers: Sequence[Logger]) -> list[Logger]:
    """The loggers that can show images (wandb's ``log_image``)."""
    return [logger for logger in loggers if callable(getattr(logger, "log_image", None))]


def numeric_entries(payload: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Flatten the numbers of a nested mapping to ``prefix/a/b`` keys (booleans, strings and None are left out)."""
    flat: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(numeric_entries(value, name))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_eval_results(logger: Logger, payload: Mapping[str, Any], grid: np.ndarray) -> None:
    """An evaluation's ``metrics.json`` numbers (quality metrics, #Step, sample count, timings) and its sample grid
    (uint8 (H, W, 3)); the settings go in as hyper-parameters. Closes the logger (an eval run logs once)."""
    logger.log_hyperparams({"sampler": payload["sampler"], "model": payload["model"],
                            "num_samples": payload["num_samples"], "seed_range": payload["seed_range"]})
    numbers_ = numeric_entries(payload["metrics"], "eval")
    numbers_ |= numeric_entries({"steps": payload["steps"], "num_samples": payload["num_samples"],
                                 "timing": payload["timing"]}, "eval")
    logger.log_metrics(numbers_, step=0)
    for target in image_loggers([logger]):
        target.log_image(key="eval/grid", images=[grid], step=0, caption=[payload["sampler"]["name"]])
    close_logger(logger)


def logging_errors() -> tuple[type[BaseException], ...]:
    """What a logger raises when its service cannot be used (wandb: no login, no network, bad project)."""
    try:
        from wandb.errors import Error as WandbError
    except ImportError:
        return ()
    return (WandbError,)


def unavailable_message(name: str, err: BaseException) -> str:
    """The reason a logger's service cannot be used (the error's first line) and the ways out."""
    from wandb.errors import AuthenticationError, CommError

    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    no_network = isinstance(err, CommError) and not isinstance(err, AuthenticationError)
    fix = "the wandb server cannot be reached; " if no_network else "run `wandb login` (or set WANDB_API_KEY), "
    return (f"logger={name} is unavailable ({reason}): {fix}set WANDB_MODE=offline for a local run folder (upload "
            f"it later with `wandb sync`), or use logger=csv")


def start_logger(logger: Logger | None, name: str) -> None:
    """Start a wandb run now (rank 0; Lightning would only at ``fit``), so that a missing login or network ends the
    command in one line before anything is trained, sampled or written (no key: at once; no network: after wandb's
    init timeout, 90 s)."""
    if not isinstance(logger, WandbLogger):
        return
    try:
        _ = logger.experiment  # the property calls wandb.init
    except logging_errors() as err:
        raise ConfigError(unavailable_message(name, err)) from err


def abandon_logger(logger: Logger | None) -> None:
    """End the wandb run of a logger that failed mid-way (its errors ignored: the failure was already reported), so
    the next logger in this process (tests, ``scripts/demo.py``) starts a run of its own instead of reusing it."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    try:
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)
    except logging_errors():
        pass


def close_logger(logger: Logger | None) -> None:
    """Flush a logger and end its wandb run: Lightning leaves the run open, and the next logger created in the same
    process (an evaluation after training, as in ``scripts/demo.py``) would otherwise log into it."""
    if logger is None:
        return
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()
