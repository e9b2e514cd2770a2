"""Parity of ``dd.models.var.vqvae.MultiScaleVQVAE`` with the official VAR VQVAE on ``var_vqvae.pt``.

The fixture checkpoint (official raw state-dict layout) is written to disk and loaded through ``dd.checkpoint`` with
strict keys; every output of fixture README section 5 is then compared at the section 8 tolerances (indices exactly,
latents 2e-5, images 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd.checkpoint import CheckpointError, extract_state_dict, load_strict, read_checkpoint
from dd.models.presets import spec_from_yaml
from dd.models.var.quant import phi_index_for
from dd.models.var.vqvae import MultiScaleVQVAE, flat_to_scales, scales_to_flat

from conftest import load_official

ATOL_LATENT = 2e-5
ATOL_IMAGE = 1e-4
RTOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=RTOL), f"max abs diff {diff}"


def build(config: dict) -> MultiScaleVQVAE:
    kwargs = {k: v for k, v in config.items() if k != "image_size"}  # image_size is derived, not an argument
    return MultiScaleVQVAE(**kwargs)


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_official("var_vqvae.pt")


@pytest.fixture(scope="module")
def vae(fx: dict, tmp_path_factory: pytest.TempPathFactory) -> MultiScaleVQVAE:
    path = tmp_path_factory.mktemp("var_vqvae") / "vae_tiny.pth"
    torch.save(fx["checkpoint"], path)
    model = build(fx["config"])
    state = extract_state_dict(read_checkpoint(path), kind="tokenizer")
    load_strict(model, model.prepare_state_dict(state), what="VAR VQVAE")
    return model


@pytest.fixture(scope="module")
def maps(fx: dict, vae: MultiScaleVQVAE) -> list[torch.Tensor]:
    """ms_h of the fixture: embedding(idx_Bl[si]) as (B, Cvae, pn, pn)."""
    return [vae.quantize.embed_map(idx, pn) for idx, pn in zip(fx["outputs"]["idx_Bl"], vae.patch_nums)]


def test_derived_sizes(fx: dict, vae: MultiScaleVQVAE) -> None:
    assert vae.patch_nums == (1, 2, 3, 4, 5) and vae.num_scales == 5
    assert vae.sequence_length == 55
    assert vae.scale_slices == ((0, 1), (1, 5), (5, 14), (14, 30), (30, 55))
    assert vae.downsample == 16 and vae.image_size == fx["config"]["image_size"] == 80
    assert vae.codebook().shape == (40, 16)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())  # test_mode


@torch.no_grad()
def test_encode_and_quantise(fx: dict, vae: MultiScaleVQVAE) -> None:
    out = fx["outputs"]
    images = fx["inputs"]["images"]
    f = vae.encode_latent(images)
    assert_close(f, out["f_BChw"], ATOL_LATENT)
    indices = vae.f_to_indices(f)
    assert len(indices) == 5
    for got, want in zip(indices, out["idx_Bl"]):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    for got, want in zip(vae.img_to_indices(images), out["idx_Bl"]):
        assert torch.equal(got, want)
    for got, want in zip(vae.f_to_fhat_per_scale(f), out["fhat_per_scale"]):
        assert_close(got, want, ATOL_LATENT)


@torch.no_grad()
def test_reconstruction_and_decoding(fx: dict, vae: MultiScaleVQVAE) -> None:
    out = fx["outputs"]
    recon = vae(fx["inputs"]["images"])
    assert_close(recon, out["recon_last"], ATOL_IMAGE)
    # official: idxBl_to_img(idx_Bl, same_shape=True, last_one=True) equals the reconstruction
    assert out["img_from_idx_last_maxdiff_vs_recon_last"] == 0.0
    assert_close(vae.decode_indices(out["idx_Bl"]), out["recon_last"], ATOL_IMAGE)
    flat = scales_to_flat(out["idx_Bl"])
    assert flat.shape == (2, 55)
    assert_close(vae.decode_indices(flat), out["recon_last"], ATOL_IMAGE)
    fhat_random = fx["inputs"]["fhat_random"]
    img = vae.fhat_to_img(fhat_random)
    assert_close(img, out["fhat_random_to_img"], ATOL_IMAGE)
    assert img.min() >= -1 and img.max() <= 1
    assert torch.equal(fhat_random, fx["inputs"]["fhat_random"])  # the input is not modified


@torch.no_grad()
def test_teacher_forcing_input_and_embed_to_fhat(fx: dict, vae: MultiScaleVQVAE, maps: list[torch.Tensor]) -> None:
    out = fx["outputs"]
    var_input = vae.indices_to_var_input(out["idx_Bl"])
    assert_close(var_input, out["var_input_BLCv"], ATOL_LATENT)
    assert var_input.shape == (2, vae.sequence_length - 1, 16)
    for got, want in zip(vae.embed_to_fhat(maps), out["embed_to_fhat_per_scale"]):
        assert_close(got, want, ATOL_LATENT)


@torch.no_grad()
def test_autoregressive_accumulation(fx: dict, vae: MultiScaleVQVAE, maps: list[torch.Tensor]) -> None:
    out = fx["outputs"]
    f_hat = torch.zeros(2, 16, 5, 5)
    for si, h in enumerate(maps):
        snapshot = f_hat.clone()
        new_f_hat, nxt = vae.next_autoregressive_input(si, f_hat, h)
        assert torch.equal(f_hat, snapshot)  # non-mutating, unlike upstream
        f_hat = new_f_hat
        assert_close(nxt, out["autoregressive_next_maps"][si], ATOL_LATENT)
    assert_close(f_hat, out["autoregressive_fhat_final"], ATOL_LATENT)
    assert torch.equal(maps[0], vae.quantize.embed_map(out["idx_Bl"][0], 1))  # inputs untouched


@torch.no_grad()
def test_next_autoregressive_input_does_not_mutate(vae: MultiScaleVQVAE, maps: list[torch.Tensor]) -> None:
    f_hat = torch.randn(2, 16, 5, 5)
    kept = f_hat.clone()
    vae.next_autoregressive_input(0, f_hat, maps[0])
    last_f_hat, last_next = vae.next_autoregressive_input(4, f_hat, maps[4])
    assert torch.equal(f_hat, kept)
    assert last_next is last_f_hat


@torch.no_grad()
def test_tokens_to_fhat_from_codebook_rows(fx: dict, vae: MultiScaleVQVAE) -> None:
    out = fx["outputs"]
    flat_ids = scales_to_flat(out["idx_Bl"])
    tokens = vae.indices_to_tokens(flat_ids)
    assert tokens.shape == (2, 55, 16)
    assert torch.equal(tokens, vae.codebook()[flat_ids])
    assert_close(vae.tokens_to_fhat(tokens), out["autoregressive_fhat_final"], ATOL_LATENT)
    assert_close(vae.decode_tokens(tokens), out["recon_last"], ATOL_IMAGE)
    parts = flat_to_scales(tokens, vae.patch_nums)
    assert [p.shape[1] for p in parts] == [1, 4, 9, 16, 25]
    assert torch.equal(scales_to_flat(parts), tokens)


def test_tokens_to_fhat_is_differentiable(vae: MultiScaleVQVAE) -> None:
    tokens = torch.randn(1, 55, 16, requires_grad=True)
    vae.decode_tokens(tokens).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_phi_index(fx: dict, vae: MultiScaleVQVAE) -> None:
    assert [vae.phi_index(si) for si in range(5)] == fx["outputs"]["phi_index_per_scale"] == [0, 1, 2, 2, 3]
    # the release's 10 scales, and the other mappings the spec lists (float64 ties decided by rounding)
    expected = {4: [0, 1, 2, 3], 5: [0, 1, 2, 2, 3], 6: [0, 0, 1, 2, 3, 3], 10: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3],
                11: [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]}
    for sn, mapping in expected.items():
        assert [phi_index_for(si, sn, 4) for si in range(sn)] == mapping
    h = torch.randn(1, 16, 5, 5)
    conv = vae.quantize.quant_resi.qresi_ls[2]  # scale 3 of 5 uses the third shared conv
    expected = h * 0.5 + torch.nn.functional.conv2d(h, conv.weight, conv.bias, padding=1) * 0.5
    assert torch.equal(vae.phi(3, h), expected)


def test_strict_loading_errors(fx: dict, vae: MultiScaleVQVAE, tmp_path: Path) -> None:
    missing = {k: v for k, v in fx["checkpoint"].items() if k != "quantize.quant_resi.qresi_ls.3.weight"}
    with pytest.raises(CheckpointError, match="quantize.quant_resi.qresi_ls.3.weight"):
        load_strict(build(fx["config"]), missing, what="VAR VQVAE")
    # a LlamaGen tokenizer file where the VAR VQVAE is expected
    path = tmp_path / "vq.pt"
    torch.save(load_official("llamagen_vq.pt")["checkpoint"], path)
    with pytest.raises(CheckpointError, match=r"unexpected keys .*decoder\.conv_blocks"):
        load_strict(build(fx["config"]), extract_state_dict(read_checkpoint(path), kind="tokenizer"), what="VAR VQVAE")


def test_ema_vocab_hit_buffer_replaced_when_scale_count_differs(fx: dict) -> None:
    config = dict(fx["config"], v_patch_nums=[1, 3, 5])  # 3 scales: the stored (5, V) buffer does not fit
    model = build(config)
    model.load_state_dict(fx["checkpoint"])  # official rule: the model keeps its own (3, V) buffer
    assert model.quantize.ema_vocab_hit_SV.shape == (3, 40)
    assert fx["checkpoint"]["quantize.ema_vocab_hit_SV"].shape == (5, 40)  # caller's dict not modified
    assert torch.equal(model.quant_conv.weight, fx["checkpoint"]["quant_conv.weight"])


def test_release_config_on_meta(fx: dict) -> None:
    """The released tokenizer's configuration, as the var_d16 preset (the only size table) writes it."""
    release = spec_from_yaml(Path(__file__).resolve().parents[1] / "configs" / "model" / "var_d16.yaml")
    with torch.device("meta"):
        model = MultiScaleVQVAE(**release.tokenizer.arch)
    # spec: 108.95 M parameters, plus the (10, 4096) ema_vocab_hit_SV buffer
    assert sum(p.numel() for p in model.parameters()) == 108_948_355
    assert sum(b.numel() for b in model.buffers()) == 10 * 4096
    state = model.state_dict()
    assert len(state) == 324 and set(state) == set(fx["checkpoint"])  # same topology as the fixture
    shapes = {
        "quantize.embedding.weight": (4096, 32),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quant_conv.weight": (32, 32, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert model.sequence_length == 680 and model.image_size == 256
    assert [model.phi_index(si) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
