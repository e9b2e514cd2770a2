"""The VAR multi-scale VQVAE training objective (``dd.models.var.vqvae_training``) on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from dd.checkpoint import extract_state_dict, load_strict, read_checkpoint
from dd.models.llamagen.training import DeadCodeRestarter, psnr_from_mse
from dd.models.var.vqvae import MultiScaleVQVAE
from dd.models.var.vqvae_training import (
    quantize_multiscale_straight_through,
    record_hits,
    scale_usages,
    vqvae_loss,
)

from conftest import REPO_ROOT, needs_fmnist


def tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    # ch_mult (1, 2): 2x downsampling, 4x4 latent for 8x8 images; 3 scales, 21 tokens
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                           v_patch_nums=(1, 2, 4), test_mode=False)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_training_indices_equal_inference(images: torch.Tensor) -> None:
    vae = tiny_vae()
    f = vae.encode_latent(images)
    out = quantize_multiscale_straight_through(vae.quantize, f)
    inference = vae.f_to_indices(f)
    assert len(out.indices) == 3
    for got, want in zip(out.indices, inference):
        assert torch.equal(got, want)
    # the straight-through latent has the value of the quantised f_hat and the gradient of f
    torch.testing.assert_close(out.f_hat, vae.f_to_fhat_per_scale(f)[-1], atol=1e-6, rtol=0)
    assert out.hits.shape == (3, 32) and out.hits.sum(1).tolist() == [4.0, 16.0, 64.0]
    assert out.latents.shape == (4 * (1 + 4 + 16), 8)
    assert torch.allclose(out.vq_loss, 0.25 * out.commitment + out.codebook)


def test_gradients_reach_every_part(images: torch.Tensor) -> None:
    vae = tiny_vae()
    vqvae_loss(vae, images).loss.backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "quantize.quant_resi.qresi_ls.3.weight",
                 "post_quant_conv.weight", "decoder.conv_out.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_one_step_reduces_the_loss(images: torch.Tensor) -> None:
    vae = tiny_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    before = vqvae_loss(vae, images)
    optimizer.zero_grad()
    before.loss.backward()
    optimizer.step()
    after = vqvae_loss(vae, images)
    assert after.loss.item() < before.loss.item()
    assert before.flat_indices.shape == (4, 21)


def test_hit_statistics_and_restarts(images: torch.Tensor) -> None:
    vae = tiny_vae()
    out = quantize_multiscale_straight_through(vae.quantize, vae.encode_latent(images))
    record_hits(vae.quantize, out.hits)
    assert torch.equal(vae.quantize.ema_vocab_hit_SV, out.hits)  # first step copies
    record_hits(vae.quantize, torch.zeros_like(out.hits))
    assert torch.allclose(vae.quantize.ema_vocab_hit_SV, out.hits * 0.9)
    usages = scale_usages(vae.quantize, positions_per_step=4 * 16)
    assert len(usages) == 3 and all(0 <= u <= 100 for u in usages)
    # the LlamaGen dead-code restarter works on the multi-scale quantiser's codebook
    restarter = DeadCodeRestarter(32, window=1)
    restarter.observe(torch.cat(out.indices, dim=1))
    dead = restarter.counts == 0
    restarted = restarter.restart(vae.quantize, out.latents, torch.Generator().manual_seed(0))
    assert restarted == int(dead.sum()) > 0
    rows = vae.codebook()[dead]
    assert all((out.latents == row).all(dim=1).any() for row in rows)


@needs_fmnist
@torch.no_grad()
def test_bundled_tiny_var_tokenizer_reconstructs_fashion_mnist() -> None:
    """The bundled fp16 asset loads strictly and reproduces its recorded quality (25.2 dB on all 10k test images;
    25.6 dB on the first 256)."""
    from dd.data.fashion_mnist import FashionMNISTDataset
    from dd.data.image_folder import uint8_to_model_images

    assets = REPO_ROOT / "dd" / "assets"
    record = json.loads((assets / "var_tiny_record.json").read_text())["tokenizer"]
    vae = MultiScaleVQVAE(**record["arch"])
    load_strict(vae, extract_state_dict(read_checkpoint(assets / "var_tiny_vqvae.pt"), kind="tokenizer"),
                what="tiny VAR VQVAE")
    assert vae.image_size == 32 and vae.sequence_length == 130
    images = uint8_to_model_images(FashionMNISTDataset("test").images[:256]).unsqueeze(1).expand(-1, 3, -1, -1)
    recon = vae(images.contiguous())
    assert psnr_from_mse(float((recon - images).pow(2).mean())) > 25.0
    ids = torch.cat(vae.img_to_indices(images[:8].contiguous()), dim=1)
    torch.testing.assert_close(vae.decode_indices(ids), recon[:8], atol=1e-4, rtol=0)
