"""Frechet distance, reference-statistics files, the bundled classifier and torch-fidelity integration."""

from __future__ import annotations

import ast
import dataclasses
import fractions
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.data.fashion_mnist import DEFAULT_ROOT, fashion_mnist_uint8
from dd.metrics import (
    FeatureStats,
    GenerationMetrics,
    compute_generation_metrics,
    compute_stats,
    frechet_distance,
    label_accuracy,
    load_classifier_metadata,
    load_fmnist_classifier,
    load_reference_stats,
    save_reference_stats,
)
from dd.metrics.classifier import CLASSIFIER_FILENAME, TEST_STATS_FILENAME, asset_path

REPO_ROOT = Path(__file__).resolve().parents[1]
from conftest import needs_fmnist


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    if not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    return fashion_mnist_uint8("test")


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance and statistics


def test_frechet_distance_of_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(0)
    stats = FeatureStats(mu=rng.normal(size=16), sigma=_random_spd(rng, 16))
    assert abs(frechet_distance(stats, stats)) < 1e-6


def test_frechet_distance_of_shifted_diagonal_gaussians_is_analytic() -> None:
    mean_shift = np.array([1.0, -2.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = FeatureStats(mu=np.zeros(3), sigma=np.diag(var_a))
    b = FeatureStats(mu=mean_shift, sigma=np.diag(var_b))
    expected = mean_shift @ mean_shift + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_symmetric_formula_for_full_covariances() -> None:
    rng = np.random.default_rng(1)
    sigma_a, sigma_b = _random_spd(rng, 12), _random_spd(rng, 12)
    a = FeatureStats(mu=rng.normal(size=12), sigma=sigma_a)
    b = FeatureStats(mu=rng.normal(size=12), sigma=sigma_b)
    root_a = _psd_sqrt(sigma_a)
    cross = np.trace(_psd_sqrt(root_a @ sigma_b @ root_a))
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_errors() -> None:
    two, three = FeatureStats(np.zeros(2), np.eye(2)), FeatureStats(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(two, three)
    broken = FeatureStats(np.zeros(2), np.diag([1.0, -1.0]))  # not PSD: sqrt of -1 is imaginary
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(broken, two)
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        FeatureStats(np.zeros(2), np.eye(3))


def test_compute_stats_recovers_gaussian_parameters() -> None:
    rng = np.random.default_rng(2)
    sigma = _random_spd(rng, 4)
    samples = rng.multivariate_normal(mean=[1.0, 2.0, 3.0, 4.0], cov=sigma, size=20_000)
    stats = compute_stats(torch.from_numpy(samples).float())
    assert stats.num_samples == 20_000 and stats.mu.dtype == np.float64 and stats.sigma.shape == (4, 4)
    assert np.allclose(stats.mu, [1.0, 2.0, 3.0, 4.0], atol=0.05)
    assert np.allclose(stats.sigma, sigma, atol=0.05)
    with pytest.raises(ValueError, match="N >= 2"):
        compute_stats(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics files


def _stats(dim: int = 5, seed: int = 3) -> FeatureStats:
    rng = np.random.default_rng(seed)
    return FeatureStats(mu=rng.normal(size=dim), sigma=_random_spd(rng, dim))


def _as_numpy1_pickle(path: Path) -> None:
    """Rewrite a torch file so its numpy globals use numpy 1 module names (as 2024-era DD statistic.pth files do)."""
    with zipfile.ZipFile(path) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as target:
        for name, data in entries.items():
            if name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(name, data)


@pytest.mark.parametrize(("numpy1_names", "legacy_format"), [(False, False), (True, False), (False, True)])
def test_load_official_statistic_pth_with_numpy_arrays(tmp_path: Path, numpy1_names: bool, legacy_format: bool) -> None:
    stats = _stats()
    folder = tmp_path / "ImageNet-256_FID_Statistic"
    folder.mkdir()
    path = folder / "statistic.pth"
    # numpy arrays inside, like the official file
    torch.save({"m": stats.mu, "s": stats.sigma}, path, _use_new_zipfile_serialization=not legacy_format)
    if numpy1_names:
        _as_numpy1_pickle(path)
        assert b"numpy.core.multiarray" in zipfile.ZipFile(path).read(f"{path.stem}/data.pkl")
    for source in (path, folder):  # the official load_act argument is the folder
        loaded = load_reference_stats(source)
        assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
        assert loaded.num_samples is None and abs(frechet_distance(loaded, stats)) < 1e-9


def test_load_adm_npz_and_dd_pt(tmp_path: Path) -> None:
    stats = _stats()
    npz = tmp_path / "VIRTUAL_ref.npz"
    np.savez(npz, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=stats.mu, sigma=stats.sigma)
    assert np.array_equal(load_reference_stats(npz).sigma, stats.sigma)

    written = save_reference_stats(compute_stats(np.random.default_rng(0).normal(size=(50, 5))), tmp_path / "s.pt",
                                   extractor="dd-fmnist-classifier")
    payload = torch.load(written, weights_only=True)
    assert set(payload) == {"m", "s", "num_samples", "extractor"} and payload["s"].dtype == torch.float64
    loaded = load_reference_stats(written)
    assert loaded.num_samples == 50 and loaded.mu.shape == (5,)


def test_load_reference_stats_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "missing.pth")
    wrong_keys = tmp_path / "wrong.pt"
    torch.save({"mean": torch.zeros(3), "cov": torch.eye(3)}, wrong_keys)
    with pytest.raises(ValueError, match=r"found keys \['cov', 'mean'\]"):
        load_reference_stats(wrong_keys)
    npz = tmp_path / "images_only.npz"
    np.savez(npz, arr_0=np.zeros(3))
    with pytest.raises(ValueError, match=r"found keys \['arr_0'\]"):
        load_reference_stats(npz)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="neither a torch file"):
        load_reference_stats(garbage)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"m": np.zeros(2), "s": np.eye(2), "extra": fractions.Fraction(1, 3)}, unsafe)
    with pytest.raises(ValueError, match="never unpickles"):
        load_reference_stats(unsafe)


# ---------------------------------------------------------------------------------------------------------------------
# Bundled classifier


def test_bundled_assets_are_small_and_weights_only_loadable() -> None:
    classifier_file, stats_file = asset_path(CLASSIFIER_FILENAME), asset_path(TEST_STATS_FILENAME)
    assert classifier_file.stat().st_size < 2 * 1024 * 1024
    payload = torch.load(classifier_file, weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    metadata = load_classifier_metadata()
    assert {"test_accuracy", "epochs", "date"} <= set(metadata) and metadata["test_accuracy"] >= 0.9
    stats = load_reference_stats(stats_file)
    assert stats.num_samples == 10_000 and stats.dim == load_fmnist_classifier().feature_dim


def test_bundled_classifier_reaches_recorded_accuracy(test_images: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = test_images
    classifier = load_fmnist_classifier()
    assert not classifier.training and next(classifier.parameters()).dtype == torch.float32
    accuracy = label_accuracy(images[:1000], labels[:1000], classifier)
    # 1000 images: allow 2 points of sampling noise around the 10k-image figure.
    assert accuracy >= load_classifier_metadata()["test_accuracy"] - 0.02
    # Float [0, 1] input and 28x28 padded input give the same predictions as uint8.
    assert label_accuracy(images[:200].float() / 255, labels[:200], classifier) == label_accuracy(
        images[:200], labels[:200], classifier
    )
    assert label_accuracy(images[:1000], labels[:1000].roll(1), classifier) < 0.3
    logits, features = classifier(images[:4]), classifier.features(images[:4])
    assert logits.shape == (4, 10) and features.shape == (4, classifier.feature_dim) and torch.all(features >= 0)


def test_fid_of_test_images_small_and_noise_large(test_images: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = test_images
    reference = load_reference_stats(asset_path(TEST_STATS_FILENAME))
    real = compute_generation_metrics(images[:2000], reference, isc=False, prc=True)
    noise_images = torch.randint(0, 256, (500, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8)
    noise = compute_generation_metrics(noise_images, asset_path(TEST_STATS_FILENAME), isc=False, prc=False)
    assert isinstance(real, GenerationMetrics) and real.num_samples == 2000 and real.fid_is_proxy
    assert real.precision is None and real.recall is None and real.isc_mean is None
    assert real.fid < 0.05 * noise.fid, (real.fid, noise.fid)
    with pytest.raises(dataclasses.FrozenInstanceError):
        real.fid = 0.0  # type: ignore[misc]


def test_generation_metrics_with_reference_images(test_images: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = test_images
    metrics = compute_generation_metrics(images[:300], images[5000:5300], isc=True, prc=True, isc_splits=3)
    assert 3.0 < metrics.isc_mean <= 10.0 and metrics.isc_std >= 0
    assert 0.5 < metrics.precision <= 1.0 and 0.5 < metrics.recall <= 1.0
    assert set(metrics.as_dict()) >= {"fid", "isc_mean", "precision", "recall", "num_samples", "fid_is_proxy"}
    noise = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    bad = compute_generation_metrics(noise, images[5000:5300], isc=True, prc=True, isc_splits=3)
    assert bad.recall < 0.05 and bad.precision < 0.5 * metrics.precision and bad.fid > 10 * metrics.fid


def test_registered_extractor_runs_in_torch_fidelity(test_images: tuple[torch.Tensor, torch.Tensor]) -> None:
    import torch_fidelity

    from dd.metrics.extractors import FMNIST_EXTRACTOR, register_feature_extractors

    register_feature_extractors()
    register_feature_extractors()  # idempotent
    images, _ = test_images

    class Images(torch.utils.data.Dataset):
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

        def __len__(self) -> int:
            return len(self.tensor)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.tensor[i]

    result = torch_fidelity.calculate_metrics(
        input1=Images(images[:200]), input2=Images(images[200:400]), feature_extractor=FMNIST_EXTRACTOR,
        isc=True, fid=True, prc=True, cuda=False, cache=False, save_cpu_ram=True, verbose=False, isc_splits=2,
    )
    assert result["inception_score_mean"] > 2.0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    ours = compute_generation_metrics(images[:200], images[200:400], isc=False, prc=False)
    assert result["frechet_inception_distance"] == pytest.approx(ours.fid, rel=1e-3)


def test_inception_without_offline_weights_explains_how_to_provide_them(tmp_path: Path) -> None:
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError) as error:
        compute_generation_metrics(images, images, extractor="inception-v3-compat")
    message = str(error.value)
    assert "feature_extractor_weights_path" in message and "hub/checkpoints" in message
    assert str(tmp_path / "torch_home") in message, "must look in $TORCH_HOME"
    unsafe = tmp_path / "weights.pth"
    torch.save({"layer": fractions.Fraction(1, 3)}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        compute_generation_metrics(images, images, extractor="inception-v3-compat",
                                   feature_extractor_weights_path=unsafe)
    with pytest.raises(ValueError, match="unknown extractor"):
        compute_generation_metrics(images, images, extractor="vgg16")
    with pytest.raises(ValueError, match="uint8"):
        compute_generation_metrics(images.float(), images)


def test_core_metric_and_data_modules_import_no_lightning_or_hydra() -> None:
    forbidden = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}
    for source in [*(REPO_ROOT / "dd" / "data").glob("*.py"), *(REPO_ROOT / "dd" / "metrics").glob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{source.name} imports {roots & forbidden}"


def test_metric_plan_checks_extractor_weights_without_an_fid_reference_and_reports_a_skipped_is(
        tmp_path) -> None:
    """metrics.reference=null with precision/recall against an image file: missing extractor weights are refused
    when the plan is made (not after all the sampling); IS, computed in the FID pass, is reported as not computed."""
    import numpy as np
    import pytest

    from dd.evaluation.quality import compute_quality, resolve_metric_plan

    real = tmp_path / "real.npz"
    np.savez(real, np.zeros((4, 8, 8, 3), dtype=np.uint8))
    cfg = {"reference": None, "prc_reference": str(real), "extractor": "dd-fmnist-classifier",
           "extractor_weights": str(tmp_path / "missing.pt")}
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_metric_plan(cfg, num_classes=10)
    plan = resolve_metric_plan({"reference": None, "prc_reference": None, "isc": True, "label_accuracy": False},
                               num_classes=10)
    result = compute_quality(np.zeros((2, 8, 8, 3), dtype=np.uint8), np.zeros(2, dtype=np.int64), plan)
    assert result["isc_mean"] is None and "metrics.reference=null" in result["errors"]["isc"]
