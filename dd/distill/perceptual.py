"""Frozen feature networks for the optional perceptual loss. Weights always come from local files or the package.

* ``fmnist_classifier``: the bundled Fashion-MNIST classifier's penultimate features (default for the tiny presets);
* ``vgg16``: torchvision VGG16 feature maps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS layers),
  ImageNet-normalised, weights from ``weights`` (a torchvision ``vgg16`` state dict file).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _VGGFeatures(nn.Module):
    _taps = (3, 8, 15, 22, 29)

    def __init__(self, weights: str) -> None:
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.layers = net.features[: self._taps[-1] + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self._taps:
                taps.append(h)
        return taps


class _ClassifierFeatures(nn.Module):
    def __init__(self, weights: str | None) -> None:
        super().__init__()
        from dd.metrics.classifier import load_fmnist_classifier

        self.net = load_fmnist_classifier(weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


def load_perceptual_network(cfg: dict[str, Any]) -> nn.Module:
    """cfg: ``{"network": "fmnist_classifier" | "vgg16", "weights": path or None}``."""
    network = cfg.get("network", "fmnist_classifier")
    if network == "fmnist_classifier":
        return _ClassifierFeatures(cfg.get("weights"))
    if network == "vgg16":
        if not cfg.get("weights"):
            raise ValueError("loss.perceptual.network=vgg16 needs loss.perceptual.weights=<local vgg16 state dict>")
        return _VGGFeatures(cfg["weights"])
    raise ValueError(f"loss.perceptual.network={network!r}: expected fmnist_classifier or vgg16")
