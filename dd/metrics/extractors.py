"""torch-fidelity feature extractors used by dd: the bundled Fashion-MNIST classifier and offline Inception-v3.

Importing this module imports torch-fidelity (and with it torchvision, about 2 s); :mod:`dd.metrics.fid` therefore
imports it lazily. After :func:`register_feature_extractors`, ``torch_fidelity.calculate_metrics(...,
feature_extractor="dd-fmnist-classifier")`` works on uint8 ``(B, 3, H, W)`` tensors and image folders like any
built-in extractor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch_fidelity
from torch.nn import functional as F
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dd.metrics.classifier import INPUT_SIZE, load_fmnist_classifier

FMNIST_EXTRACTOR = "dd-fmnist-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]

# Feature layer per metric, for each extractor dd supports.
FEATURE_LAYERS: dict[str, dict[str, str]] = {
    FMNIST_EXTRACTOR: {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"},
    INCEPTION_EXTRACTOR: {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"},
}


class FMNISTClassifierExtractor(torch_fidelity.FeatureExtractorBase):
    """The bundled :class:`~dd.metrics.classifier.FashionMNISTClassifier` as a torch-fidelity feature extractor.

    Input: uint8 ``(B, 3, H, W)`` in ``[0, 255]`` (torch-fidelity's contract); non-32x32 inputs are resized inside the
    classifier. Provided features:

    * ``"features"``: ``(B, 128)`` post-ReLU penultimate layer (FID, KID, precision/recall);
    * ``"logits"``: ``(B, 10)`` class logits, the default for ISC: softmax(logits) is the posterior the classifier was
      trained to produce;
    * ``"logits_unbiased"``: ``(B, 10)`` logits without the head bias, named after torch-fidelity's Inception feature
      (whose TF ancestor ignored the bias), for callers that want that convention.

    ``feature_extractor_weights_path`` selects another classifier file (default: the bundled one).
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        super().__init__(name, features_list)
        self.classifier = load_fmnist_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return FEATURE_LAYERS[FMNIST_EXTRACTOR][metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {getattr(x, 'dtype', type(x))} {tuple(x.shape)}")
        features = self.classifier.features(x)
        head = self.classifier.head
        outputs = {
            "features": features,
            "logits": head(features),
            "logits_unbiased": F.linear(features, head.weight),
        }
        return tuple(outputs[name] for name in self.features_list)


def register_feature_extractors() -> None:
    """Register :data:`FMNIST_EXTRACTOR` with torch-fidelity (idempotent)."""
    if FMNIST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(FMNIST_EXTRACTOR, FMNISTClassifierExtractor)


def inception_weights_help(looked_at: Path) -> str:
    """The instructions shown when Inception weights are not available offline."""
    return (
        f"Inception-v3 weights for torch-fidelity's '{INCEPTION_EXTRACTOR}' are not available offline (looked for "
        f"{looked_at}); dd never downloads them. Get {INCEPTION_WEIGHTS_FILENAME} from {URL_INCEPTION_V3} on a "
        "machine with internet, then either pass feature_extractor_weights_path=<local file>, or place it in "
        "$TORCH_HOME/hub/checkpoints/ (TORCH_HOME defaults to ~/.cache/torch). Note: pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth has different parameter names and does not load here. "
        f"For Fashion-MNIST, extractor='{FMNIST_EXTRACTOR}' needs no download."
    )


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """Locate torch-fidelity Inception weights offline and check that they are a plain tensor state dict.

    ``path`` given: that file; otherwise ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``.
    torch-fidelity later reads the file with ``weights_only=False``; loading it here first with ``weights_only=True``
    guarantees the pickle references only tensor types, so that second load cannot execute code.

    Raises:
        FileNotFoundError: the file is missing (message says how to provide it).
        ValueError: the file is not a tensor state dict.
    """
    default = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    candidate = Path(path) if path is not None else default
    if not candidate.is_file():
        raise FileNotFoundError(inception_weights_help(candidate))
    try:
        state = torch.load(candidate, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means: not a plain state dict
        raise ValueError(f"{candidate} is not a tensor state dict loadable with weights_only=True: {error}") from error
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{candidate} does not hold a state dict of tensors (got {type(state).__name__})")
    return candidate
