"""A small Fashion-MNIST CNN: the feature extractor behind FID/IS/precision-recall of the tiny default preset.

Inception-v3 costs about half a second per image on the project CPUs and knows nothing of 28x28 clothing, so the tiny
preset measures FID in the penultimate-feature space of this classifier instead (a *proxy* FID; numbers are not
comparable to Inception FIDs). Weights and the Fashion-MNIST test-set statistics ship in ``dd/assets`` and are produced
by ``scripts/train_classifier.py``.

Input convention of :meth:`FashionMNISTClassifier.forward` / :meth:`~FashionMNISTClassifier.features`:
``(B, C, H, W)`` with C in {1, 3}, either uint8 in ``[0, 255]`` or float in ``[0, 1]`` (not ``[-1, 1]``). Channels
are averaged to grayscale (RGB from grayscale data is exact); images that are not 32x32 are resized bilinearly
(antialiased) to 32x32, so 28x28 Fashion-MNIST must be zero-padded by 2 px to match the training distribution.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

INPUT_SIZE = 32
DEFAULT_WIDTHS: tuple[int, int, int] = (32, 64, 128)
DEFAULT_FEATURE_DIM = 128
NUM_CLASSES = 10
CLASSIFIER_FILENAME = "fmnist_classifier.pt"
TEST_STATS_FILENAME = "fmnist_test_stats.pt"


def asset_path(filename: str) -> Path:
    """Path of a file bundled in ``dd/assets``."""
    return Path(str(resources.files("dd") / "assets" / filename))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` or float ``[0, 1]`` ``(B, C, H, W)`` -> float32 ``(B, 1, 32, 32)`` standardised grayscale."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    # Fashion-MNIST (padded) pixel statistics: centring speeds up training and is part of the model's contract.
    return (x - 0.25) / 0.35


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU -> 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionMNISTClassifier(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px), a ``feature_dim`` ReLU feature layer and a 10-way linear head.

    ``forward(images) -> logits (B, 10)``; ``features(images) -> (B, feature_dim)`` (non-negative, post-ReLU, the FID
    space). See the module docstring for the image convention.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = DEFAULT_WIDTHS,
        feature_dim: int = DEFAULT_FEATURE_DIM,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.widths = tuple(widths)
        self.feature_dim = feature_dim
        self.blocks = nn.Sequential(_conv_block(1, w1), _conv_block(w1, w2), _conv_block(w2, w3))
        spatial = INPUT_SIZE // 8
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(w3 * spatial * spatial, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images (uint8 ``[0, 255]`` or float ``[0, 1]``)."""
        return self.feature(self.blocks(to_classifier_input(images)))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)`` features -> ``(B, num_classes)`` logits."""
        return self.head(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.logits_from_features(self.features(images))


def load_fmnist_classifier(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FashionMNISTClassifier:
    """Load the bundled (or a given) classifier file in eval mode, float32, without gradients.

    The file holds ``{"state_dict": ..., "config": {"widths": [...], "feature_dim": int}, "metadata": {...}}`` and is
    read with ``weights_only=True``.
    """
    path = Path(path) if path is not None else asset_path(CLASSIFIER_FILENAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; create them with `python scripts/train_classifier.py`"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = payload["config"]
    model = FashionMNISTClassifier(widths=tuple(config["widths"]), feature_dim=int(config["feature_dim"]))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def load_classifier_metadata(path: str | Path | None = None) -> dict:
    """The metadata dict stored with the classifier (test accuracy, epochs, date, ...)."""
    path = Path(path) if path is not None else asset_path(CLASSIFIER_FILENAME)
    return dict(torch.load(path, map_location="cpu", weights_only=True)["metadata"])


@torch.no_grad()
def predict_labels(images: torch.Tensor, classifier: nn.Module, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes int64 ``(N,)`` for images ``(N, C, H, W)`` (classifier's input convention), batched."""
    device = next(classifier.parameters()).device
    predictions = [classifier(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch_size)]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
