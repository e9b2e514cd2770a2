"""Evaluation metrics (pure torch + numpy/scipy + torch-fidelity; no lightning, no hydra).

torch-fidelity itself is imported lazily (it pulls in torchvision); its extractor adapters live in
:mod:`dd.metrics.extractors`.
"""

from dd.metrics.classifier import (
    FashionMNISTClassifier,
    load_classifier_metadata,
    load_fmnist_classifier,
    predict_labels,
)
from dd.metrics.fid import (
    FeatureStats,
    GenerationMetrics,
    compute_generation_metrics,
    compute_stats,
    frechet_distance,
    label_accuracy,
    load_reference_stats,
    save_reference_stats,
)

__all__ = [
    "FashionMNISTClassifier",
    "FeatureStats",
    "GenerationMetrics",
    "compute_generation_metrics",
    "compute_stats",
    "frechet_distance",
    "label_accuracy",
    "load_classifier_metadata",
    "load_fmnist_classifier",
    "load_reference_stats",
    "predict_labels",
    "save_reference_stats",
]
