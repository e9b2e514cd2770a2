"""The bundled tiny LlamaGen teacher (dd/assets/llamagen_tiny_{vq,gpt}.pt) loads strictly through the ``gpt_tiny``
preset and still performs as measured when it was trained (docs/bundled_teacher.md).

Measured at training time on the first 256 Fashion-MNIST test images, float32 from the fp16 files:
reconstruction MSE (pixels in [-1, 1]) 0.01074 and teacher cross-entropy 2.642 nats per token (uniform would be
log 256 = 5.545). Thresholds: MSE < 1.5 x 0.01074 = 0.0161 and cross-entropy < 2.642 + 0.15 = 2.792 nats, slack for
other CPUs and torch versions while still failing on a wrong or untrained file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from dd.data.fashion_mnist import DEFAULT_ROOT, FashionMNISTDataset
from dd.data.image_folder import uint8_to_model_images
from dd.models.llamagen import make_spec
from dd.models.llamagen.spec import ASSETS_DIR
from dd.models.llamagen.training import next_token_loss, quantize_straight_through, tokenizer_loss

PRESET = Path(__file__).resolve().parents[1] / "configs" / "model" / "gpt_tiny.yaml"
NUM_IMAGES = 256
MEASURED_MSE = 0.01074  # first 256 test images, bundled fp16 weights loaded in float32 (2026-11-22)
MEASURED_CE = 2.642  # same images; the full test set gives 2.736 (dd/assets/llamagen_tiny_record.json)
MAX_MSE = 1.5 * MEASURED_MSE
MAX_CE = MEASURED_CE + 0.15

needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def spec():
    return make_spec(**yaml.safe_load(PRESET.read_text()))


@pytest.fixture(scope="module")
def test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNISTDataset("test")
    images = uint8_to_model_images(data.images[:NUM_IMAGES]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return images, data.labels[:NUM_IMAGES]


def test_bundled_files_are_small_fp16_in_official_layout() -> None:
    for name in ("llamagen_tiny_vq.pt", "llamagen_tiny_gpt.pt"):
        path = ASSETS_DIR / name
        assert path.stat().st_size < 4_000_000
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert list(payload) == ["model"]
        assert all(t.dtype == torch.float16 for t in payload["model"].values() if t.is_floating_point())


def test_bundled_weights_load_strictly_through_the_preset(spec) -> None:
    tokenizer, teacher = spec.build_tokenizer(), spec.build_teacher()  # strict loading raises on any key mismatch
    assert not tokenizer.training and not teacher.training
    assert next(tokenizer.parameters()).dtype == torch.float32
    assert teacher.vocab_size == tokenizer.codebook_size == 256


@needs_data
@torch.no_grad()
def test_bundled_tokenizer_reconstructs_fashion_mnist(spec, test_batch) -> None:
    images, _ = test_batch
    tokenizer = spec.build_tokenizer()
    quant, ids = tokenizer.encode(images)
    assert ids.shape == (NUM_IMAGES, 64)
    mse = float((tokenizer.decode(quant.contiguous()) - images).pow(2).mean())
    assert mse < MAX_MSE, f"reconstruction MSE {mse:.5f} (measured {MEASURED_MSE}, threshold {MAX_MSE:.5f})"


@needs_data
@torch.no_grad()
def test_bundled_teacher_predicts_test_tokens(spec, test_batch) -> None:
    images, labels = test_batch
    _, ids = spec.build_tokenizer().encode(images)
    teacher = spec.build_teacher()
    cross_entropy = float(next_token_loss(teacher, labels, ids))
    assert cross_entropy < MAX_CE < math.log(256) - 1.0, (
        f"teacher test cross-entropy {cross_entropy:.4f} nats (measured {MEASURED_CE}, threshold {MAX_CE:.4f})")
    unconditional = float(next_token_loss(teacher, torch.full_like(labels, teacher.null_class), ids))
    assert unconditional > cross_entropy, "the class label should make the test tokens more predictable"


def test_training_quantiser_matches_inference_and_passes_gradients(spec) -> None:
    """The straight-through look-up used in training picks the same codes as ``VectorQuantizer.quantize``."""
    tokenizer = spec.build_tokenizer()
    latent = torch.randn(2, tokenizer.embed_dim, 8, 8, requires_grad=True)
    quant, indices = tokenizer.quantize.quantize(latent.detach())
    trained = quantize_straight_through(tokenizer.quantize, latent)
    assert torch.equal(trained.indices, indices)
    torch.testing.assert_close(trained.quant, quant)
    trained.quant.sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    out = tokenizer_loss(tokenizer.train(), torch.rand(2, 3, 32, 32) * 2 - 1)
    out.loss.backward()
    assert tokenizer.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook loss reaches the codebook
