"""Quality metrics of an evaluation run, wrapping :mod:`dd.metrics` (FID, IS, precision/recall, label accuracy).

Settings (``metrics:`` in ``configs/eval.yaml``):

* ``reference``: ``bundled`` (the Fashion-MNIST test-set statistics shipped in ``dd/assets``, for the tiny
  Fashion-MNIST presets), a path to the official DD ``statistic.pth`` (or its folder), an ADM ``.npz`` with
  ``mu``/``sigma``, or a dd statistics ``.pt``; ``null`` skips FID.
* ``extractor``: ``auto`` (the bundled Fashion-MNIST classifier for ``bundled``, else Inception-v3), or a name
  from :data:`dd.metrics.extractors.FEATURE_LAYERS`.
* ``prc_reference``: real images for precision/recall (statistics are not enough): ``auto`` (the Fashion-MNIST
  test set when the extractor is the Fashion-MNIST classifier and the dataset is installed), ``null``, or an ``.npz``
  whose ``arr_0`` holds uint8 (N, H, W, 3) images (e.g. the ADM reference batch).
* ``label_accuracy``: ``auto`` (with the Fashion-MNIST classifier, for 10-class models), ``true`` or ``false``.

Everything that can be checked without sampling (files present, feature dimensions, offline Inception weights) is
checked by :func:`resolve_metric_plan`, which the entry point calls before loading any model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd.checkpoint import file_sha256

log = logging.getLogger("dd.evaluation")

BUNDLED = "bundled"
FMNIST_EXTRACTOR = "dd-fmnist-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
FMNIST_NUM_CLASSES = 10
_FEATURE_DIMS = {FMNIST_EXTRACTOR: None, INCEPTION_EXTRACTOR: 2048}  # None: read from the classifier file


@dataclass(frozen=True)
class MetricPlan:
    """Resolved metric settings: what will be computed and from which files (all paths checked to exist)."""

    enabled: bool
    reference: str | None  # resolved file of the FID statistics, or None (no FID)
    reference_sha256: str | None
    reference_num_samples: int | None
    extractor: str
    extractor_weights: str | None
    isc: bool
    prc_reference: str | None  # "fashion-mnist-test", an .npz path, or None
    prc_max_real: int
    label_accuracy: bool
    batch_size: int

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _reference_file(reference: str) -> Path:
    from dd.metrics.classifier import asset_path

    if reference == BUNDLED:
        return asset_path("fmnist_test_stats.pt")
    path = Path(reference).expanduser()
    return path / "statistic.pth" if path.is_dir() else path


def _extractor_dim(extractor: str, weights: str | None) -> int:
    if extractor == FMNIST_EXTRACTOR:
        from dd.metrics.classifier import CLASSIFIER_FILENAME, asset_path

        payload = torch.load(weights or asset_path(CLASSIFIER_FILENAME), map_location="cpu", weights_only=True)
        return int(payload["config"]["feature_dim"])
    return int(_FEATURE_DIMS[extractor])


def _fmnist_test_available() -> bool:
    from dd.data.fashion_mnist import DEFAULT_ROOT

    return (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file() or (DEFAULT_ROOT / "t10k-images-idx3-ubyte").is_file()


def _choose_extractor(cfg: Mapping[str, Any]) -> str:
    extractor = str(cfg.get("extractor", "auto"))
    if extractor == "auto":
        return FMNIST_EXTRACTOR if cfg.get("reference") == BUNDLED else INCEPTION_EXTRACTOR
    if extractor not in _FEATURE_DIMS:
        raise ValueError(f"metrics.extractor={extractor!r}: choose auto, {FMNIST_EXTRACTOR} or {INCEPTION_EXTRACTOR}")
    return extractor


def _check_extractor_weights(extractor: str, weights: str | None) -> None:
    if extractor == INCEPTION_EXTRACTOR:
        from dd.metrics.extractors import resolve_inception_weights

        resolve_inception_weights(weights)  # FileNotFoundError explains how to provide the weights offline
    elif weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"metrics.extractor_weights={weights}: file not found")


def _plan_prc(cfg: Mapping[str, Any], extractor: str) -> str | None:
    value = cfg.get("prc_reference", "auto")
    if value in (None, False, "none", "null") or not cfg.get("prc", True):
        return None
    if value == "auto":
        return "fashion-mnist-test" if extractor == FMNIST_EXTRACTOR and _fmnist_test_available() else None
    if value == "fashion-mnist-test":
        if not _fmnist_test_available():
            raise FileNotFoundError("metrics.prc_reference=fashion-mnist-test: install the Debian package "
                                    "dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
        return value
    if not Path(value).is_file():
        raise FileNotFoundError(f"metrics.prc_reference={value}: file not found (expected an .npz with arr_0)")
    return str(value)


def _plan_label_accuracy(cfg: Mapping[str, Any], extractor: str, num_classes: int) -> bool:
    value = cfg.get("label_accuracy", "auto")
    if value == "auto":
        return extractor == FMNIST_EXTRACTOR and num_classes == FMNIST_NUM_CLASSES
    return bool(value)


def resolve_metric_plan(cfg: Mapping[str, Any], num_classes: int) -> MetricPlan:
    """Check the ``metrics`` settings without sampling anything; raises ValueError / FileNotFoundError."""
    enabled = bool(cfg.get("enabled", True))
    extractor = _choose_extractor(cfg)
    weights = cfg.get("extractor_weights")
    reference, sha, count = None, None, None
    if enabled and cfg.get("reference") not in (None, "none", "null"):
        path = _reference_file(str(cfg["reference"]))
        if not path.is_file():
            raise FileNotFoundError(f"metrics.reference={cfg['reference']}: reference statistics {path} not found")
        _check_extractor_weights(extractor, weights)
        from dd.metrics.fid import load_reference_stats

        stats = load_reference_stats(path)
        if stats.dim != _extractor_dim(extractor, weights):
            raise ValueError(f"reference statistics {path} have {stats.dim}-d features, but extractor {extractor} "
                             f"gives {_extractor_dim(extractor, weights)}-d: set metrics.extractor to match")
        reference, sha, count = str(path), file_sha256(path), stats.num_samples
    prc = _plan_prc(cfg, extractor) if enabled else None
    if prc is not None and reference is None:  # precision/recall alone also runs the extractor: checked before sampling
        _check_extractor_weights(extractor, weights)
    return MetricPlan(enabled=enabled, reference=reference, reference_sha256=sha, reference_num_samples=count,
                      extractor=extractor, extractor_weights=weights, isc=enabled and bool(cfg.get("isc", True)),
                      prc_reference=prc,
                      prc_max_real=int(cfg.get("prc_max_real", 10000)),
                      label_accuracy=enabled and _plan_label_accuracy(cfg, extractor, num_classes),
                      batch_size=int(cfg.get("batch_size", 256)))


def _real_images(plan: MetricPlan) -> torch.Tensor:
    """uint8 (M, 3, H, W) real images for precision/recall."""
    if plan.prc_reference == "fashion-mnist-test":
        from dd.data.fashion_mnist import fashion_mnist_uint8

        images = fashion_mnist_uint8("test")[0]
    else:
        with np.load(plan.prc_reference, allow_pickle=False) as archive:
            images = torch.from_numpy(archive["arr_0"][: plan.prc_max_real]).permute(0, 3, 1, 2).contiguous()
    return images[: plan.prc_max_real]


def _guarded(name: str, errors: dict[str, str], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one metric; a ValueError (too few samples for a covariance, ...) is recorded instead of raised."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        log.warning("%s not computed: %s", name, err)
        errors[name] = str(err)
        return None


def compute_quality(images_nhwc: np.ndarray, labels: np.ndarray, plan: MetricPlan,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """FID (vs the reference statistics), IS, precision/recall (vs real images) and label accuracy.

    images_nhwc uint8 (N, H, W, 3) (a memory map is fine), labels (N,). Metrics that cannot be computed are None,
    with the reason under ``errors``.
    """
    from dd.metrics.fid import compute_generation_metrics, label_accuracy

    result: dict[str, Any] = {"fid": None, "isc_mean": None, "isc_std": None, "precision": None, "recall": None,
                              "label_accuracy": None, "extractor": plan.extractor, "num_samples": len(labels)}
    errors: dict[str, str] = {}
    if not plan.enabled:
        return result | {"errors": errors}
    with warnings.catch_warnings():  # a read-only memory map: the metrics only read it
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2)
    common = {"extractor": plan.extractor, "feature_extractor_weights_path": plan.extractor_weights,
              "batch_size": plan.batch_size, "device": device}
    if plan.reference is not None:
        main = _guarded("fid", errors, compute_generation_metrics, images, plan.reference, isc=plan.isc, prc=False,
                        **common)
        if main is not None:
            result |= {"fid": main.fid, "isc_mean": main.isc_mean, "isc_std": main.isc_std}
    elif plan.isc:
        errors["isc"] = "IS is computed in the FID pass, which metrics.reference=null skips (set a reference)"
    if plan.prc_reference is not None:
        pr = _guarded("precision_recall", errors, compute_generation_metrics, images, _real_images(plan), isc=False,
                      prc=True, **common)
        if pr is not None:
            result |= {"precision": pr.precision, "recall": pr.recall}
    if plan.label_accuracy:
        result["label_accuracy"] = _guarded("label_accuracy", errors, label_accuracy, images,
                                            torch.from_numpy(np.asarray(labels)))
    return result | {"errors": errors}
