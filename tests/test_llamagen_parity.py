"""Parity with the official LlamaGen / LlamaGen-DD code on the official-layout fixtures (tolerances: fixture README §8).

Every check goes through dd's public API: the checkpoint is written to disk in its official layout and loaded by
``load_weights`` with strict keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd.models.llamagen import (
    LlamaGenFamily,
    arch_from_official_args,
    build_student,
    build_teacher,
    build_tokenizer,
    generate,
    load_weights,
)
from dd.sampling.choosers import global_multinomial_chooser, greedy_chooser
from dd.sampling.dd_samplers import fewstep_sample, teacher_involved_sample
from dd.sampling.logits import SamplingConfig

from conftest import load_official

ATOL, RTOL = 1e-4, 1e-5
ATOL_CFG = 2e-4
ATOL_TOKENS = 2e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "-inf pattern differs"
    finite = torch.isfinite(expected)
    diff = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs diff {diff}"


def _saved(tmp_path: Path, fx: dict, name: str) -> Path:
    path = tmp_path / name
    torch.save(fx["checkpoint"], path)
    return path


@pytest.fixture(scope="module")
def vq_fx() -> dict:
    return load_official("llamagen_vq.pt")


@pytest.fixture(scope="module")
def gpt_fx() -> dict:
    return load_official("llamagen_gpt.pt")


@pytest.fixture(scope="module")
def dd_fx() -> dict:
    return load_official("llamagen_dd.pt")


@pytest.fixture(scope="module")
def tokenizer(vq_fx: dict, tmp_path_factory: pytest.TempPathFactory):
    model = build_tokenizer(**arch_from_official_args(vq_fx["config"], "tokenizer"))
    return load_weights(model, _saved(tmp_path_factory.mktemp("vq"), vq_fx, "vq.pt"), kind="tokenizer")


@pytest.fixture(scope="module")
def teacher(gpt_fx: dict, tmp_path_factory: pytest.TempPathFactory):
    model = build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher"))
    return load_weights(model, _saved(tmp_path_factory.mktemp("gpt"), gpt_fx, "gpt.pt"), kind="teacher")


@pytest.fixture(scope="module")
def student(dd_fx: dict, tmp_path_factory: pytest.TempPathFactory):
    model = build_student(codebook=dd_fx["codebook"], **arch_from_official_args(dd_fx["config"], "student"))
    return load_weights(model, _saved(tmp_path_factory.mktemp("dd"), dd_fx, "dd.pt"), kind="student")


# -- tokenizer -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,image_key", [("", "images"), ("rect_", "images_rect")])
def test_tokenizer_encode_decode(tokenizer, vq_fx: dict, prefix: str, image_key: str) -> None:
    out = vq_fx["outputs"]
    images = vq_fx["inputs"][image_key]
    with torch.no_grad():
        assert_close(tokenizer.encoder(images), out[prefix + "encoder_hidden"], atol=2e-5)
        assert_close(tokenizer.encode_latent(images), out[prefix + "encoder_out"], atol=2e-5)
        quant, ids = tokenizer.encode(images)
        assert torch.equal(ids, out[prefix + "indices_BL"])
        assert torch.equal(ids.reshape(-1), out[prefix + "indices"])
        assert_close(quant, out[prefix + "quant"], atol=2e-5)
        grid = tuple(int(v) for v in out[prefix + "latent_shape"][2:])
        assert_close(tokenizer.decode_indices(ids, grid), out[prefix + "decoded_from_indices"])
        assert_close(tokenizer(images), out[prefix + "forward_reconstruction"])


def test_tokenizer_continuous_decode_and_codebook(tokenizer, vq_fx: dict) -> None:
    out = vq_fx["outputs"]
    with torch.no_grad():
        assert_close(tokenizer.decode(out["continuous_latent"]), out["decoded_continuous"])
    assert_close(tokenizer.codebook(), out["codebook_l2normalized"], atol=2e-5)


# -- teacher ---------------------------------------------------------------------------------------------------------
def test_teacher_rope_table(teacher, gpt_fx: dict) -> None:
    assert_close(teacher.rope, gpt_fx["outputs"]["freqs_cis"], atol=1e-6)


@pytest.mark.parametrize("key,n_tokens,null", [("tf_logits_24", 24, False), ("tf_logits_25", 25, False),
                                               ("tf_logits_null_24", 24, True)])
def test_teacher_forcing(teacher, gpt_fx: dict, key: str, n_tokens: int, null: bool) -> None:
    labels = gpt_fx["inputs"]["labels"]
    if null:
        labels = torch.full_like(labels, teacher.null_class)
    with torch.no_grad():
        logits = teacher(labels, gpt_fx["inputs"]["tokens"][:, :n_tokens])
    assert_close(logits, gpt_fx["outputs"][key])


def _config(kwargs: dict) -> SamplingConfig:
    return SamplingConfig(cfg_scale=kwargs["cfg_scale"], cfg_interval=kwargs["cfg_interval"],
                          temperature=kwargs["temperature"], top_k=kwargs["top_k"], top_p=kwargs["top_p"],
                          sample=kwargs["sample_logits"])


def _official_chooser(config: SamplingConfig):
    return global_multinomial_chooser if config.sample else greedy_chooser


@pytest.mark.parametrize("case", ["top1_cfg1.0", "top1_cfg3.0", "top1_cfg2.5_interval5", "argmax_cfg1.5",
                                  "rng_seed5_cfg2.0_topk0", "rng_seed5_cfg1.5_topk12_topp0.8_temp1.3"])
def test_teacher_generation(teacher, gpt_fx: dict, case: str) -> None:
    expected = gpt_fx["outputs"]["generation"][case]
    kwargs = expected["kwargs"]
    config = _config(kwargs)
    torch.manual_seed(kwargs["seed"])
    result = generate(teacher, gpt_fx["inputs"]["labels"], kwargs["max_new_tokens"], config,
                      _official_chooser(config), record_logits=True)
    assert torch.equal(result.tokens, expected["tokens"])
    assert_close(result.step_logits, expected["step_logits"], atol=ATOL_CFG)
    assert all(layer.attention.kv_cache is None for layer in teacher.layers), "generation must free its caches"


@pytest.mark.parametrize("case", ["prefix7_new6_top1_cfg3.0", "prefix3_new10_top1_cfg2.0_interval4"])
def test_teacher_intermediate_generation(teacher, gpt_fx: dict, case: str) -> None:
    expected = gpt_fx["outputs"]["intermediate_generation"][case]
    kwargs = expected["kwargs"]
    config = _config(kwargs)
    torch.manual_seed(kwargs["seed"])
    result = generate(teacher, gpt_fx["inputs"]["labels"], kwargs["max_new_tokens"], config,
                      _official_chooser(config), prefix=expected["prefix"], record_logits=True)
    assert torch.equal(result.tokens, expected["tokens"])
    assert_close(result.step_logits, expected["step_logits"], atol=ATOL_CFG)


# -- DD student ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["t0", "t3", "t12", "t24", "tmixed_0_9_17"])
def test_student_forward_and_final_predict(student, dd_fx: dict, case: str) -> None:
    inputs, expected = dd_fx["inputs"], dd_fx["outputs"]["per_t"][case]
    labels, t = inputs["labels"], expected["t"]
    x_t = student.perturb(inputs["x0_data_tokens"], t, inputs["noise"])
    assert torch.equal(x_t, expected["x_t"])
    assert torch.equal(student.nearest_indices(x_t), expected["gt_idx"])
    with torch.no_grad():
        tokens, logits = student(x_t, labels, t)
        assert_close(tokens, expected["forward_tokens"], atol=ATOL_TOKENS)
        assert_close(logits, expected["forward_logits"])
        tokens, logits = student.final_predict(x_t, labels, t)
    assert_close(tokens, expected["final_predict_tokens"], atol=ATOL_TOKENS)
    assert_close(logits, expected["final_predict_logits"])
    for split, final in expected["final_x_BLC"].items():
        assert_close(student.final_sequence(tokens, logits, int(split)), final, atol=ATOL_TOKENS)


@pytest.mark.parametrize("case", ["tlist_0_split7", "tlist_0_12_split7", "tlist_0_split19", "tlist_0_12_split19",
                                  "tlist_0_6_15_split10"])
def test_fewstep_loop(student, tokenizer, teacher, dd_fx: dict, case: str) -> None:
    expected = dd_fx["outputs"]["fewstep"][case]
    inputs = dd_fx["inputs"]
    result = fewstep_sample(student, inputs["labels"], inputs["noise"], expected["t_list"], expected["split_t"])
    assert result.model_evals == len(expected["t_list"])
    for step, ref in zip(result.steps, expected["steps"]):
        assert_close(step.x_t, ref["x_t"], atol=ATOL_TOKENS)
        assert_close(step.logits, ref["final_predict_logits"])
        assert_close(step.sequence, ref["final_x_BLC"], atol=ATOL_TOKENS)
    assert_close(result.sequence, expected["final_tokens"], atol=ATOL_TOKENS)
    family = LlamaGenFamily(tokenizer, teacher)
    assert_close(tokenizer.tokens_to_latent(result.sequence, family.grid), expected["latent_BChw"], atol=ATOL_TOKENS)
    if "images_0_1_unclamped" in expected:
        images = (family.decode(result.sequence) + 1) / 2
        assert_close(images, expected["images_0_1_unclamped"])


@pytest.mark.parametrize("case", ["teacher_start_4", "teacher_start_10", "teacher_start_0"])
def test_teacher_involved_loop(student, tokenizer, teacher, dd_fx: dict, case: str) -> None:
    expected = dd_fx["outputs"]["teacher_involved"][case]
    inputs = dd_fx["inputs"]
    kw = expected["sampling_kwargs"]
    config = SamplingConfig(cfg_scale=expected["cfg_scale"], cfg_interval=expected["cfg_interval"],
                            temperature=kw.get("temperature", 1.0), top_k=kw["top_k"], top_p=kw.get("top_p", 1.0),
                            sample=kw.get("sample_logits", True))
    family = LlamaGenFamily(tokenizer, teacher)
    torch.manual_seed(expected["seed"])
    start = expected["teacher_start_t"]
    result = teacher_involved_sample(student, family, inputs["labels"], inputs["noise"], expected["t_list"],
                                     expected["split_t"], start, config, _official_chooser(config))
    if start > 0:
        assert_close(result.steps[0].sequence, expected["step1_final_x_BLC"], atol=ATOL_TOKENS)
        assert torch.equal(result.teacher_ids[:, :start], expected["prefix_idx"])
    assert torch.equal(result.teacher_ids, expected["teacher_index_sample"])
    assert_close(result.steps[-1].x_t, expected["step2_x_t"], atol=ATOL_TOKENS)
    assert torch.equal(student.nearest_indices(result.steps[-1].x_t), expected["step2_gt_idx"])
    assert_close(result.sequence, expected["final_tokens"], atol=ATOL_TOKENS)
    t2 = expected["t_list"][1]
    assert result.model_evals == int(start > 0) + (t2 - start) + 1
    if "images_0_1_unclamped" in expected:
        assert_close((family.decode(result.sequence) + 1) / 2, expected["images_0_1_unclamped"])
