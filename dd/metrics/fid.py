"""FID, Inception Score and precision/recall of generated images against reference data or statistics.

* :class:`FeatureStats` / :func:`compute_stats` / :func:`frechet_distance`: Gaussian feature statistics and the
  Frechet distance ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (Heusel et al. 2017), computed like the
  official DD evaluation (pytorch-fid derivative: ``np.cov(rowvar=False)``, ``scipy.linalg.sqrtm``, a retry with
  ``1e-6 * I`` added to both covariances when the root is not finite) except that a large imaginary part raises
  instead of returning the sentinel FID 114514.
* :func:`load_reference_stats`: the official DD ``statistic.pth`` (keys ``m``/``s``, numpy arrays or tensors), an
  ADM-evaluator ``.npz`` (``mu``/``sigma``) or a file written by :func:`save_reference_stats`; or a folder holding
  ``statistic.pth`` (the official ``load_act`` argument is a folder).
* :func:`compute_generation_metrics`: features through a torch-fidelity extractor (the bundled Fashion-MNIST
  classifier, or offline Inception-v3), then FID (here), IS and precision/recall (torch-fidelity's implementations).
* :func:`label_accuracy`: how often a classifier recognises the class that was asked for.

Inception FIDs computed here use torch-fidelity's TF-compatible Inception port; the official DD script uses
pytorch-fid's port of the same TF weights (pool3 2048-d features, plain bilinear resize), so numbers agree closely but
not bit-exactly with the official evaluation.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import Dataset

from dd.metrics.classifier import load_fmnist_classifier, predict_labels

OFFICIAL_STATS_FILENAME = "statistic.pth"
FULL_SCALE_NUM_SAMPLES = 50_000
DEFAULT_EXTRACTOR = "dd-fmnist-classifier"


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of a feature set: ``mu`` float64 ``(D,)``, ``sigma`` float64 ``(D, D)``.

    ``num_samples`` is the number of feature vectors they were computed from, when known.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FeatureStats needs mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.mu.shape[0])


def compute_stats(features: np.ndarray | torch.Tensor) -> FeatureStats:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``) in float64 of features ``(N, D)``, N >= 2."""
    array = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"compute_stats needs features of shape (N >= 2, D), got {array.shape}")
    return FeatureStats(mu=array.mean(axis=0), sigma=np.cov(array, rowvar=False), num_samples=int(array.shape[0]))


def frechet_distance(
    stats_a: FeatureStats, stats_b: FeatureStats, eps: float = 1e-6, imaginary_tolerance: float = 1e-3
) -> float:
    """Frechet distance between two Gaussians ``N(mu_a, S_a)`` and ``N(mu_b, S_b)`` (the FID formula).

    Raises:
        ValueError: dimensions differ, or the matrix square root keeps an imaginary diagonal component larger than
            ``imaginary_tolerance`` (numerically broken statistics).
    """
    if stats_a.dim != stats_b.dim:
        raise ValueError(
            f"feature dimensions differ: {stats_a.dim} vs {stats_b.dim} (statistics from different feature extractors?)"
        )
    diff = stats_a.mu - stats_b.mu
    covmean = _sqrtm(stats_a.sigma @ stats_b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(stats_a.dim) * eps
        covmean = _sqrtm((stats_a.sigma + offset) @ (stats_b.sigma + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > imaginary_tolerance:
            raise ValueError(f"matrix square root has an imaginary component {largest:.3g} > {imaginary_tolerance}")
        covmean = covmean.real
    value = diff @ diff + np.trace(stats_a.sigma) + np.trace(stats_b.sigma) - 2.0 * np.trace(covmean)
    return float(value)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` with non-finite results passed through (the caller retries).

    Singular products are normal here (post-ReLU features have dead units); scipy's LinAlgWarning about them is
    silenced because the result is checked for finiteness and imaginary parts by the caller.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics files


def _numpy_safe_globals() -> list[Any]:
    """Globals that numpy arrays/scalars pickle to, under both numpy 1 (``numpy.core``) and 2 (``numpy._core``) names.

    Only array/dtype reconstruction is allowed (no arbitrary callables), so ``weights_only=True`` stays safe.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
        entries.append((multiarray.scalar, f"{module}.scalar"))
    entries.extend(type(np.dtype(code)) for code in ("f2", "f4", "f8", "i4", "i8", "u1", "b1"))
    return entries


def _as_float64(value: Any, key: str, path: Path) -> np.ndarray:
    """A tensor or array from a stats file as float64 numpy."""
    if torch.is_tensor(value):
        return value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    raise ValueError(f"{path}: key {key!r} holds {type(value).__name__}, expected an array or tensor")


def _stats_from_mapping(mapping: Any, path: Path) -> FeatureStats:
    """FeatureStats from a dict with ``m``/``s`` (official DD, dd) or ``mu``/``sigma`` (ADM, pytorch-fid) keys."""
    if not hasattr(mapping, "keys"):
        raise ValueError(f"{path}: expected a dict of statistics, found {type(mapping).__name__}")
    keys = sorted(str(k) for k in mapping.keys())
    for mean_key, cov_key in (("m", "s"), ("mu", "sigma")):
        if mean_key in mapping and cov_key in mapping:
            count = mapping["num_samples"] if "num_samples" in mapping else None
            return FeatureStats(
                mu=_as_float64(mapping[mean_key], mean_key, path),
                sigma=_as_float64(mapping[cov_key], cov_key, path),
                num_samples=int(count) if count is not None else None,
            )
    raise ValueError(
        f"{path}: unknown statistics format; found keys {keys}, expected 'm' and 's' (DD statistic.pth / dd) "
        "or 'mu' and 'sigma' (ADM .npz)"
    )


def _load_torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with numpy arrays allow-listed; clear errors for unsafe or foreign files."""
    with open(path, "rb") as handle:
        legacy = handle.read(2) == b"\x80\x02"  # torch's pre-1.6 format is a bare protocol-2 pickle stream
    if not (legacy or zipfile.is_zipfile(path)):
        raise ValueError(f"{path} is neither a torch file nor an .npz; cannot read statistics from it")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = "legacy format, not listed" if legacy else torch.serialization.get_unsafe_globals_in_checkpoint(path)
        raise ValueError(
            f"{path} references objects that are not allowed in a statistics file ({unsafe}); dd loads statistics "
            "with weights_only=True and never unpickles arbitrary code"
        ) from error


def _load_npz(path: Path) -> dict[str, Any]:
    """The ``mu``/``sigma`` arrays of an ``.npz`` (no pickles); other keys map to None so errors can name them."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: (archive[k] if k in ("mu", "sigma") else None) for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz archive: {error}") from error


def load_reference_stats(path: str | Path) -> FeatureStats:
    """Load reference feature statistics.

    Accepted: the official DD ``statistic.pth`` (torch file, keys ``m``/``s``, numpy arrays or tensors), a folder
    holding one (the official ``load_act`` convention), an ADM-style ``.npz`` with ``mu``/``sigma``, or a ``.pt``
    written by :func:`save_reference_stats`. Never unpickles arbitrary objects.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unknown format (the message lists the keys found) or disallowed pickled objects.
    """
    path = Path(path)
    if path.is_dir():
        path = path / OFFICIAL_STATS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    if path.suffix == ".npz":
        return _stats_from_mapping(_load_npz(path), path)
    return _stats_from_mapping(_load_torch_file(path), path)


def save_reference_stats(stats: FeatureStats, path: str | Path, extractor: str | None = None) -> Path:
    """Write statistics in the official DD key convention (``m``, ``s``) as float64 tensors, plus ``num_samples``
    and ``extractor`` when known. Loadable with ``weights_only=True`` and by :func:`load_reference_stats`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"m": torch.from_numpy(stats.mu.copy()), "s": torch.from_numpy(stats.sigma.copy())}
    if stats.num_samples is not None:
        payload["num_samples"] = int(stats.num_samples)
    if extractor is not None:
        payload["extractor"] = extractor
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Generation metrics


@dataclass(frozen=True)
class GenerationMetrics:
    """Metrics of one set of generated images.

    ``fid_is_proxy`` is True when the FID is not comparable with the paper's FID-50k: fewer than 50,000 samples, or a
    feature extractor other than Inception-v3. ``isc_*`` are None when IS was not requested; ``precision``/``recall``
    are None when not requested or when the reference was given as statistics only (they need real features).
    """

    fid: float
    isc_mean: float | None
    isc_std: float | None
    precision: float | None
    recall: float | None
    num_samples: int
    extractor: str
    fid_is_proxy: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)


class _ImageTensorDataset(Dataset):
    """uint8 ``(N, 3, H, W)`` as a Dataset of ``(3, H, W)`` tensors (torch-fidelity's input contract)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _check_uint8_images(images: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a uint8 tensor (N, 3, H, W); got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")


def _extract_features(
    images: torch.Tensor, extractor: nn.Module, batch_size: int, cuda: bool
) -> dict[str, torch.Tensor]:
    """Features ``{layer: (N, D)}`` of uint8 images through a torch-fidelity extractor (no workers, no cache)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    dataset = _ImageTensorDataset(images)
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, save_cpu_ram=True, verbose=False)


def _create_extractor(name: str, layers: list[str], weights_path: str | Path | None, cuda: bool) -> nn.Module:
    """A torch-fidelity extractor; Inception weights must exist locally (never downloaded)."""
    from torch_fidelity.utils import create_feature_extractor

    from dd.metrics import extractors

    extractors.register_feature_extractors()
    if name == extractors.INCEPTION_EXTRACTOR:
        weights_path = extractors.resolve_inception_weights(weights_path)
    path = str(weights_path) if weights_path is not None else None
    return create_feature_extractor(name, layers, cuda=cuda, feature_extractor_weights_path=path, verbose=False)


def _reference_features_or_stats(
    reference: FeatureStats | torch.Tensor | str | Path,
) -> FeatureStats | torch.Tensor:
    if isinstance(reference, (str, Path)):
        return load_reference_stats(reference)
    if isinstance(reference, FeatureStats):
        return reference
    _check_uint8_images(reference, "reference images")
    return reference


def _inception_score(logits: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    """torch-fidelity's IS (mean, std over ``splits`` shuffled splits, capped at N) from logits ``(N, C)``."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    scores = isc_features_to_metric(logits, splits=min(splits, len(logits)), rng_seed=seed)
    return scores["inception_score_mean"], scores["inception_score_std"]


def _precision_recall(generated: torch.Tensor, real: torch.Tensor, neighborhood: int) -> tuple[float, float]:
    """torch-fidelity's improved precision/recall (Kynkaanniemi et al. 2019) of features ``(N, D)`` vs ``(M, D)``."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    # The full pairwise-distance path holds N x M floats; switch to torch-fidelity's batched path for large sets.
    batched = len(generated) * len(real) > 100_000_000
    scores = prc_features_to_metric(generated, real, prc_neighborhood=neighborhood, save_cpu_ram=batched, verbose=False)
    return scores["precision"], scores["recall"]


def compute_generation_metrics(
    images: torch.Tensor,
    reference: FeatureStats | torch.Tensor | str | Path,
    extractor: str = DEFAULT_EXTRACTOR,
    isc: bool = True,
    prc: bool = True,
    feature_extractor_weights_path: str | Path | None = None,
    batch_size: int = 256,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 2020,
) -> GenerationMetrics:
    """FID (+ IS, precision/recall) of generated images.

    Args:
        images: generated images, uint8 ``(N, 3, H, W)`` in ``[0, 255]``.
        reference: statistics (:class:`FeatureStats` or a file for :func:`load_reference_stats`) or real images
            uint8 ``(M, 3, H', W')``. Precision/recall need real images; with statistics they are None.
        extractor: ``"dd-fmnist-classifier"`` (bundled, 128-d features) or ``"inception-v3-compat"`` (2048-d; weights
            must be available offline, see :func:`dd.metrics.extractors.resolve_inception_weights`).
        isc: compute the Inception Score (over the extractor's logits, ``isc_splits`` splits, capped at N).
        prc: compute precision/recall (Kynkaanniemi et al. 2019, ``prc_neighborhood``-NN radii).
        feature_extractor_weights_path: local weights for the extractor (default: bundled classifier / $TORCH_HOME).
        device: ``"cpu"`` or a CUDA device (torch-fidelity uses the current CUDA device).
        seed: seed of the IS split shuffle.

    Raises:
        FileNotFoundError: Inception weights not available offline (message explains how to provide them).
        ValueError: bad image tensors, or reference statistics of another feature dimension.
    """
    from dd.metrics import extractors

    _check_uint8_images(images, "images")
    reference = _reference_features_or_stats(reference)
    if extractor not in extractors.FEATURE_LAYERS:
        raise ValueError(f"unknown extractor {extractor!r}; choose one of {sorted(extractors.FEATURE_LAYERS)}")
    fid_layer, isc_layer = extractors.FEATURE_LAYERS[extractor]["fid"], extractors.FEATURE_LAYERS[extractor]["isc"]
    cuda = torch.device(device).type == "cuda"
    layers = [fid_layer, isc_layer] if isc else [fid_layer]
    model = _create_extractor(extractor, layers, feature_extractor_weights_path, cuda)

    generated = _extract_features(images, model, batch_size, cuda)
    real = None if isinstance(reference, FeatureStats) else _extract_features(reference, model, batch_size, cuda)
    reference_stats = reference if isinstance(reference, FeatureStats) else compute_stats(real[fid_layer])
    fid = frechet_distance(compute_stats(generated[fid_layer]), reference_stats)
    isc_mean, isc_std = _inception_score(generated[isc_layer], isc_splits, seed) if isc else (None, None)
    precision = recall = None
    if prc and real is not None:  # precision/recall need real features, statistics are not enough
        precision, recall = _precision_recall(generated[fid_layer], real[fid_layer], prc_neighborhood)
    num_samples = int(images.shape[0])
    return GenerationMetrics(
        fid=fid,
        isc_mean=isc_mean,
        isc_std=isc_std,
        precision=precision,
        recall=recall,
        num_samples=num_samples,
        extractor=extractor,
        fid_is_proxy=num_samples < FULL_SCALE_NUM_SAMPLES or extractor != extractors.INCEPTION_EXTRACTOR,
    )


def label_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None) -> float:
    """Fraction of images ``(N, 3, H, W)`` (uint8, or float in [0, 1]) that ``classifier`` assigns to ``labels (N,)``.

    Default classifier: the bundled Fashion-MNIST one. Measures class-conditional faithfulness of a generator.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (> 0); got {len(images)} images and {len(labels)} labels")
    classifier = classifier if classifier is not None else load_fmnist_classifier()
    predictions = predict_labels(images, classifier)
    return float((predictions == labels.cpu().long()).float().mean())
