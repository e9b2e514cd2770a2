"""Parity of the VAR teacher and the VAR DD student with the official code on ``var_teacher.pt`` / ``var_dd.pt``.

Every check goes through dd's public API: each fixture checkpoint is written to disk in its official layout (raw
VQVAE and teacher state dicts, ``{'trainer': {'ema_parameters', 'var_wo_ddp'}}`` for the student) and loaded by
``dd.models.var.load_weights`` with strict keys. Tolerances are the fixture README's section 8: indices exactly,
logits 1e-4, CFG-combined logits 2e-4, sequences / f_hat 2e-5, images 1e-4, ``-inf`` patterns exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dd.checkpoint import CheckpointError
from dd.models.var import (
    MultiScaleVQVAE,
    VARDDStudent,
    VARFamily,
    VARTransformer,
    build_student,
    build_teacher,
    build_vqvae,
    load_weights,
    make_spec,
    var_generate,
)
from dd.models.var.vqvae import flat_to_scales
from dd.sampling.choosers import GeneratorMultinomialChooser, greedy_chooser
from dd.sampling.dd_samplers import fewstep_sample, teacher_involved_sample
from dd.sampling.logits import SamplingConfig

from conftest import load_official

ATOL, RTOL = 1e-4, 1e-5  # logits
ATOL_CFG = 2e-4  # CFG-combined logits
ATOL_SEQ = 2e-5  # continuous tokens, sequences, f_hat, teacher-forcing input
ATOL_IMAGE = 1e-4

TEACHER_KEYS = ("depth", "embed_dim", "num_heads", "num_classes", "mlp_ratio", "norm_eps", "attn_l2_norm",
                "cond_drop_rate", "shared_aln", "drop_rate", "attn_drop_rate", "drop_path_rate", "patch_nums")
#: the tensors the fixture's decoy entry ``trainer.var_wo_ddp`` re-randomises (README section 1)
DECOY_TENSORS = ("n_d_embed.weight", "class_emb.weight", "head.bias", "final_layer_conti.linear.bias",
                 "word_embed.bias", "layerwise_n_d_embed.3.bias")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "-inf pattern differs"
    assert torch.equal(actual == float("-inf"), expected == float("-inf")), "-inf pattern differs"
    finite = torch.isfinite(expected)
    diff = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs diff {diff}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _save(directory: Path, payload: Any, name: str) -> Path:
    path = directory / name
    torch.save(payload, path)
    return path


def _derived(key: str) -> bool:
    """Buffers a VAR transformer derives from its shape (``lvl_1L``, the mask, every ``zero_k_bias``)."""
    return key in ("lvl_1L", "attn_bias_for_masking") or key.endswith(".zero_k_bias")


# -- fixtures ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vq_fx() -> dict:
    return load_official("var_vqvae.pt")


@pytest.fixture(scope="module")
def teacher_fx() -> dict:
    return load_official("var_teacher.pt")


@pytest.fixture(scope="module")
def dd_fx() -> dict:
    return load_official("var_dd.pt")


def _vqvae_arch(vq_fx: dict) -> dict:
    return {k: v for k, v in vq_fx["config"].items() if k != "image_size"}  # image_size is derived


def _teacher_arch(teacher_fx: dict, vq_fx: dict) -> dict:
    """The official VAR constructor fields of the fixture plus what the VQVAE fixes (vocabulary, Cvae)."""
    arch = {k: teacher_fx["config"][k] for k in TEACHER_KEYS}
    return dict(arch, vocab_size=vq_fx["config"]["vocab_size"], z_channels=vq_fx["config"]["z_channels"])


def _student_arch(dd_fx: dict, vq_fx: dict) -> dict:
    arch = _teacher_arch(dd_fx, vq_fx)
    assert arch["patch_nums"] == dd_fx["config"]["base_patch_nums"]  # the student prepends the sos scale itself
    return arch


@pytest.fixture(scope="module")
def files(vq_fx: dict, teacher_fx: dict, dd_fx: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("var_official")
    return {"vqvae": _save(directory, vq_fx["checkpoint"], "vae_tiny.pth"),
            "teacher": _save(directory, teacher_fx["checkpoint"], "var_tiny.pth"),
            "student": _save(directory, dd_fx["checkpoint"], "var_dd_tiny.pth")}


@pytest.fixture(scope="module")
def vqvae(vq_fx: dict, files: dict[str, Path]) -> MultiScaleVQVAE:
    return load_weights(build_vqvae(**_vqvae_arch(vq_fx)), files["vqvae"], kind="tokenizer")


@pytest.fixture(scope="module")
def teacher(teacher_fx: dict, vq_fx: dict, files: dict[str, Path]) -> VARTransformer:
    return load_weights(build_teacher(**_teacher_arch(teacher_fx, vq_fx)), files["teacher"], kind="teacher")


def _student(dd_fx: dict, vq_fx: dict, vqvae: MultiScaleVQVAE) -> VARDDStudent:
    return build_student(codebook=vqvae.codebook(), **_student_arch(dd_fx, vq_fx))


@pytest.fixture(scope="module")
def student(dd_fx: dict, vq_fx: dict, vqvae: MultiScaleVQVAE, files: dict[str, Path]) -> VARDDStudent:
    return load_weights(_student(dd_fx, vq_fx, vqvae), files["student"], kind="student")


def _tf_input(vqvae: MultiScaleVQVAE, prefix_scales: list[torch.Tensor]) -> torch.Tensor:
    """``idxBl_to_var_input`` of the given leading scales, later scales filled with arbitrary ids (they only feed
    slots after the ones the prefix determines)."""
    filler = [torch.full((prefix_scales[0].shape[0], pn * pn), (7 * si) % vqvae.vocab_size)
              for si, pn in enumerate(vqvae.patch_nums)]
    return vqvae.indices_to_var_input(list(prefix_scales) + filler[len(prefix_scales):])


# -- loading -----------------------------------------------------------------------------------------------------------
def test_loaded_models(teacher: VARTransformer, student: VARDDStudent, vqvae: MultiScaleVQVAE, teacher_fx: dict,
                       dd_fx: dict) -> None:
    assert not teacher.training and not student.training
    assert teacher.sequence_length == teacher_fx["config"]["L"] == 55
    assert [list(s) for s in teacher.scale_slices] == teacher_fx["config"]["begin_ends"]
    assert teacher.null_class == 6
    for name, tensor in teacher_fx["checkpoint"].items():
        assert torch.equal(teacher.state_dict()[name], tensor), name
    for name, tensor in dd_fx["checkpoint"]["trainer"]["ema_parameters"].items():
        assert torch.equal(student.state_dict()[name], tensor), name
    assert student.slots == dd_fx["config"]["L"] == 56 and student.patch_nums == tuple(dd_fx["config"]["dd_patch_nums"])
    assert torch.equal(student.codebook, vqvae.codebook())


# -- teacher -----------------------------------------------------------------------------------------------------------
def test_teacher_forcing_input_from_indices(vqvae: MultiScaleVQVAE, teacher_fx: dict) -> None:
    inputs = teacher_fx["inputs"]
    with torch.no_grad():
        assert_close(vqvae.indices_to_var_input(inputs["idx_Bl"]), inputs["x_BLCv_wo_first_l"], atol=ATOL_SEQ)
    flat = torch.cat(inputs["idx_Bl"], dim=1)
    assert torch.equal(vqvae.codebook()[flat], inputs["x_tokens_BLCv"])


@pytest.mark.parametrize("key,null", [("tf_logits", False), ("tf_logits_null_label", True)])
def test_teacher_forcing(teacher: VARTransformer, teacher_fx: dict, key: str, null: bool) -> None:
    labels = teacher_fx["inputs"]["labels"]
    if null:
        labels = torch.full_like(labels, teacher.null_class)
    x = teacher_fx["inputs"]["x_BLCv_wo_first_l"]
    expected = teacher_fx["outputs"][key]
    with torch.no_grad():
        logits = teacher(labels, x)
        # cond_drop_rate = 0.1 in the config: evaluation never drops labels (the fixture used cond_drop_rate = 0)
        again = teacher(labels, x)
        prefix = teacher(labels, x[:, :13])  # scales 0..2 only: the block-causal mask is cropped
    assert logits.dtype == torch.float32
    assert_close(logits, expected)
    assert torch.equal(logits, again)
    assert_close(prefix, expected[:, :14])


def _generation_config(kwargs: dict) -> SamplingConfig:
    # the official top_p = 0 means "off"; dd's "off" is 1.0
    return SamplingConfig(cfg_scale=kwargs["cfg"], top_k=kwargs["top_k"], top_p=kwargs["top_p"] or 1.0)


@pytest.mark.parametrize("case", ["top1_cfg2.5", "top1_cfg0.5", "top1_cfg0.0", "top1_topp0.9_cfg4.0",
                                  "rng_gseed11_cfg1.5_topk8_topp0.8", "rng_gseed11_cfg2.0_topk0_topp0.0"])
def test_teacher_generation(teacher: VARTransformer, vqvae: MultiScaleVQVAE, teacher_fx: dict, case: str) -> None:
    expected = teacher_fx["outputs"]["generation"][case]
    kwargs = expected["kwargs"]
    assert expected["deterministic"] == (not case.startswith("rng_"))
    if expected["deterministic"]:
        chooser = greedy_chooser
    else:  # the model's own generator re-seeded with g_seed, one multinomial draw per scale (bit parity)
        assert kwargs["g_seed"] == 11
        chooser = GeneratorMultinomialChooser(torch.Generator().manual_seed(kwargs["g_seed"]))
    result = var_generate(teacher, vqvae, teacher_fx["inputs"]["labels"], _generation_config(kwargs), chooser,
                          record_logits=True)
    assert result.indices.dtype == torch.int64 and result.indices.shape == (3, 55)
    for got, want in zip(flat_to_scales(result.indices, vqvae.patch_nums), expected["idx_per_scale"]):
        assert torch.equal(got, want)
    assert_close(result.f_hat, expected["fhat_final"], atol=ATOL_SEQ)
    if "cfg_logits_per_scale" in expected:
        assert len(result.step_logits) == len(expected["cfg_logits_per_scale"]) == 5
        for got, want in zip(result.step_logits, expected["cfg_logits_per_scale"]):
            assert_close(got, want, atol=ATOL_CFG)
    if "images_0_1" in expected:
        with torch.no_grad():
            assert_close((vqvae.fhat_to_img(result.f_hat) + 1) / 2, expected["images_0_1"], atol=ATOL_IMAGE)


def test_kv_cache_generation_matches_block_causal_teacher_forcing(teacher: VARTransformer, vqvae: MultiScaleVQVAE,
                                                                  teacher_fx: dict) -> None:
    """The fixture's ``tf_vs_kvcache_maxerr`` check: CFG-mixed teacher forcing on the generated ids equals the cached
    step logits."""
    expected = teacher_fx["outputs"]["generation"]["top1_cfg2.5"]
    labels = teacher_fx["inputs"]["labels"]
    result = var_generate(teacher, vqvae, labels, SamplingConfig(cfg_scale=2.5, top_k=1, top_p=1.0), greedy_chooser,
                          record_logits=True)
    x = vqvae.indices_to_var_input(flat_to_scales(result.indices, vqvae.patch_nums))
    with torch.no_grad():
        cond, uncond = teacher(labels, x), teacher(torch.full_like(labels, teacher.null_class), x)
    worst = 0.0
    for si, (begin, end) in enumerate(teacher.scale_slices):
        w = 2.5 * si / 4
        forced = (1 + w) * cond[:, begin:end] - w * uncond[:, begin:end]
        assert_close(result.step_logits[si], forced, atol=ATOL_CFG)
        worst = max(worst, max_diff(result.step_logits[si], forced))
    assert worst < max(4 * expected["tf_vs_kvcache_maxerr"], 1e-4)


@pytest.mark.parametrize("case", ["start_0", "start_2", "start_3"])
def test_teacher_intermediate_sample(teacher: VARTransformer, vqvae: MultiScaleVQVAE, teacher_fx: dict,
                                     case: str) -> None:
    expected = teacher_fx["outputs"]["intermediate_sample"][case]
    labels = teacher_fx["inputs"]["labels"]
    start, end = expected["start_t"], expected["end_point"]
    assert end == 4 and expected["top_k"] == 1
    config = SamplingConfig(cfg_scale=expected["cfg"], top_k=expected["top_k"], top_p=expected["top_p"] or 1.0)
    begin = teacher.scale_slices[start][0]
    prefix = torch.cat(teacher_fx["inputs"]["idx_Bl"], dim=1)[:, :begin] if start > 0 else None
    result = var_generate(teacher, vqvae, labels, config, greedy_chooser, start_scale=start, end_scale=end,
                          prefix=prefix, record_logits=True)
    assert result.indices.shape == (3, 30)
    if prefix is not None:
        assert torch.equal(result.indices[:, :begin], prefix)
    assert torch.equal(result.indices[:, begin:], torch.cat(expected["idx_per_scale"], dim=1))
    assert_close(vqvae.codebook()[result.indices], expected["sequence"], atol=ATOL_SEQ)
    assert len(result.step_logits) == len(expected["cfg_logits_per_scale"]) == end - start
    for got, want in zip(result.step_logits, expected["cfg_logits_per_scale"]):
        assert_close(got, want, atol=ATOL_CFG)
    if "images_0_1" in expected:  # the image of the partial f_hat (scales 0..3 of 5)
        with torch.no_grad():
            assert_close((vqvae.fhat_to_img(result.f_hat) + 1) / 2, expected["images_0_1"], atol=ATOL_IMAGE)
    # the family entry point takes continuous prefix tokens and snaps them to their codebook rows (the official
    # intermediate_sample input x_tokens_BLCv); the default prefix attention is the official unmasked one
    family = VARFamily(vqvae, teacher)
    assert family.prefix_attention == "bidirectional"
    ids = family.teacher_generate(labels, start, end, teacher_fx["inputs"]["x_tokens_BLCv"], config, greedy_chooser)
    assert torch.equal(ids, result.indices)


@pytest.mark.parametrize("start", [2, 3])
def test_block_causal_prefix_is_teacher_forcing(teacher: VARTransformer, vqvae: MultiScaleVQVAE, teacher_fx: dict,
                                                start: int) -> None:
    """``prefix_attention="block_causal"``: the prefix pass gives, at scale ``start``, exactly teacher forcing's
    logits on ``idxBl_to_var_input`` of the prefix ids; the official unmasked prefix (what the fixture encodes)
    differs from it by the fixture's ``prefix_logits_vs_block_causal_maxdiff`` (README quirk 13)."""
    expected = teacher_fx["outputs"]["intermediate_sample"][f"start_{start}"]
    labels = teacher_fx["inputs"]["labels"]
    null = torch.full_like(labels, teacher.null_class)
    scales = teacher_fx["inputs"]["idx_Bl"][:start]
    prefix = torch.cat(scales, dim=1)
    begin, end = teacher.scale_slices[start]
    x = _tf_input(vqvae, scales)
    with torch.no_grad():
        cond, uncond = teacher(labels, x[:, :end - 1]), teacher(null, x[:, :end - 1])
        full = teacher(labels, x)  # full length: the block-causal mask hides the (arbitrary) later scales
    assert_close(full[:, begin:end], cond[:, begin:end])
    # scale `start` of the fixture's own teacher-forcing input (its real later scales) gives the same logits
    assert_close(teacher_fx["outputs"]["tf_logits"][:, begin:end], cond[:, begin:end])

    def prefix_pass(cfg: float, attention: str) -> torch.Tensor:
        result = var_generate(teacher, vqvae, labels, SamplingConfig(cfg_scale=cfg, top_k=1), greedy_chooser,
                              start_scale=start, end_scale=start + 1, prefix=prefix, prefix_attention=attention,
                              record_logits=True)
        assert torch.equal(result.indices[:, :begin], prefix)
        return result.step_logits[0]

    # cfg 0: no guidance and no batch doubling, the raw conditional logits
    block_causal = prefix_pass(0.0, "block_causal")
    assert_close(block_causal, cond[:, begin:end])
    assert max_diff(prefix_pass(0.0, "bidirectional"), cond[:, begin:end]) > 0.1
    # the fixture's cfg 3.0: guidance weight 3.0 * start / 4 on both halves of the doubled batch
    w = expected["cfg"] * start / 4
    forced = (1 + w) * cond[:, begin:end] - w * uncond[:, begin:end]
    guided = prefix_pass(expected["cfg"], "block_causal")
    assert_close(guided, forced, atol=ATOL_CFG)
    official = expected["cfg_logits_per_scale"][0]
    assert_close(prefix_pass(expected["cfg"], "bidirectional"), official, atol=ATOL_CFG)
    gap = max_diff(guided, official)
    assert gap > 0.5
    assert gap == pytest.approx(expected["prefix_logits_vs_block_causal_maxdiff"], abs=1e-3)


# -- DD student ----------------------------------------------------------------------------------------------------
def test_student_noise_mask_and_data_counts(student: VARDDStudent, dd_fx: dict) -> None:
    assert torch.equal(student.noise_mask, dd_fx["outputs"]["noise_mask"])
    accum = dd_fx["config"]["accum_token_length"]
    assert student.num_data_tokens(torch.arange(6)).tolist() == [55 - accum[t + 1] for t in range(6)]
    assert student.num_data_tokens(torch.arange(6)).tolist() == [0, 1, 5, 14, 30, 55]


@pytest.mark.parametrize("case", ["t0", "t1", "t3", "t4", "tmixed_0_2_4"])
def test_student_forward_final_predict_and_sequence(student: VARDDStudent, dd_fx: dict, case: str) -> None:
    inputs, expected = dd_fx["inputs"], dd_fx["outputs"]["per_t"][case]
    labels, t = inputs["labels"], expected["t"]
    assert torch.equal(inputs["x0_tokens_BLCv"], student.codebook[inputs["x0_idx"]])
    x_t = student.perturb(inputs["x0_tokens_BLCv"], t, inputs["noise"])
    assert torch.equal(x_t, expected["x_t"])
    with torch.no_grad():
        tokens, logits = student(x_t, labels, t)
        assert_close(tokens, expected["forward_conti"], atol=ATOL_SEQ)
        assert_close(logits, expected["forward_logits"])
        tokens, logits = student.final_predict(x_t, labels, t)
    assert_close(tokens, expected["final_predict_conti"], atol=ATOL_SEQ)
    assert_close(logits, expected["final_predict_logits"])  # -inf at the given positions, pattern compared exactly
    given = student.num_data_tokens(t)
    for b in range(3):
        assert torch.isinf(logits[b, :given[b]]).sum().item() == given[b].item() * 39
    assert set(expected["final_sequence"]) == {0, 2, 3, 5}
    for split, final in expected["final_sequence"].items():
        assert_close(student.final_sequence(tokens, logits, int(split)), final, atol=ATOL_SEQ)


@pytest.mark.parametrize("case", ["tlist_0_split3", "tlist_0_3_split3", "tlist_0_split2", "tlist_0_2_split2",
                                  "tlist_0_2_4_split3"])
def test_fewstep_loop(student: VARDDStudent, vqvae: MultiScaleVQVAE, dd_fx: dict, case: str) -> None:
    expected = dd_fx["outputs"]["fewstep"][case]
    inputs = dd_fx["inputs"]
    result = fewstep_sample(student, inputs["labels"], inputs["noise"], expected["t_list"], expected["loss_split_t"])
    assert result.model_evals == len(expected["t_list"]) == len(expected["steps"])
    for step, ref in zip(result.steps, expected["steps"]):
        assert step.t == ref["t"]
        assert_close(step.x_t, ref["x_t"], atol=ATOL_SEQ)
        assert_close(step.tokens, ref["final_predict_conti"], atol=ATOL_SEQ)
        assert_close(step.logits, ref["final_predict_logits"])
        assert_close(step.sequence, ref["final_sequence"], atol=ATOL_SEQ)
    assert_close(result.sequence, expected["final_sequence"], atol=ATOL_SEQ)
    with torch.no_grad():
        f_hat = vqvae.tokens_to_fhat(result.sequence)
        assert_close(f_hat, expected["fhat_final"], atol=ATOL_SEQ)
        if "images_0_1" in expected:
            assert_close((vqvae.fhat_to_img(f_hat) + 1) / 2, expected["images_0_1"], atol=ATOL_IMAGE)
    assert ("images_0_1" in expected) == (case == "tlist_0_3_split3")


@pytest.mark.parametrize("case,evals", [("t_teacher_start_3", 3), ("t_teacher_start_2", 4), ("t_teacher_start_0", 5)])
def test_teacher_involved_loop(student: VARDDStudent, teacher: VARTransformer, vqvae: MultiScaleVQVAE, dd_fx: dict,
                               case: str, evals: int) -> None:
    expected = dd_fx["outputs"]["teacher_involved"][case]
    inputs = dd_fx["inputs"]
    labels = inputs["labels"]
    start = expected["t_teacher_start"]
    assert (expected["t_list"], expected["loss_split_t"]) == ([0, 4], 3)
    assert (expected["cfg"], expected["top_k"], expected["top_p"]) == (2.5, 1, 0.95)
    config = SamplingConfig(cfg_scale=2.5, top_k=1, top_p=0.95)
    family = VARFamily(vqvae, teacher)
    torch.manual_seed(expected["seed"])
    result = teacher_involved_sample(student, family, labels, inputs["noise"], [0, 4], 3, start, config,
                                     greedy_chooser)
    assert result.model_evals == evals == int(start > 0) + (4 - start) + 1
    n_prefix = family.data_length(start)
    prefix_ids = None
    if start > 0:
        step1 = result.steps[0]
        assert step1.t == 0
        assert_close(step1.sequence, expected["step1_final_sequence"], atol=ATOL_SEQ)
        prefix_ids = student.nearest_indices(step1.sequence)  # every position snapped to its codebook row
        assert_close(vqvae.codebook()[prefix_ids], expected["step1_quantized"], atol=ATOL_SEQ)
        prefix_ids = prefix_ids[:, :n_prefix]
        assert torch.equal(result.teacher_ids[:, :n_prefix], prefix_ids)
    assert result.teacher_ids.shape == (3, family.data_length(4)) == (3, 30)
    assert torch.equal(result.teacher_ids[:, n_prefix:], torch.cat(expected["teacher_idx_per_scale"], dim=1))
    assert_close(vqvae.codebook()[result.teacher_ids], expected["teacher_sequence"], atol=ATOL_SEQ)
    # the teacher's CFG logits of this pipeline (official unmasked prefix)
    teacher_run = var_generate(teacher, vqvae, labels, config, greedy_chooser, start_scale=start, end_scale=4,
                               prefix=prefix_ids, record_logits=True)
    assert torch.equal(teacher_run.indices, result.teacher_ids)
    for got, want in zip(teacher_run.step_logits, expected["teacher_cfg_logits_per_scale"], strict=True):
        assert_close(got, want, atol=ATOL_CFG)
    step2 = result.steps[-1]
    assert step2.t == 4 and len(result.steps) == int(start > 0) + 1
    assert_close(step2.x_t, expected["step2_x_t"], atol=ATOL_SEQ)
    assert_close(result.sequence, expected["final_sequence"], atol=ATOL_SEQ)
    with torch.no_grad():
        f_hat = vqvae.tokens_to_fhat(result.sequence)
        assert_close(f_hat, expected["fhat_final"], atol=ATOL_SEQ)
        if "images_0_1" in expected:
            assert_close((vqvae.fhat_to_img(f_hat) + 1) / 2, expected["images_0_1"], atol=ATOL_IMAGE)


# -- student checkpoint entries and buffers ----------------------------------------------------------------------------
def _fixture_spec(vq_fx: dict, dd_fx: dict, files: dict[str, Path]):
    """A VARSpec of the fixture models, as a ``configs/model`` YAML would describe them."""
    teacher_arch = {k: v for k, v in _student_arch(dd_fx, vq_fx).items()
                    if k not in ("vocab_size", "z_channels", "patch_nums")}
    return make_spec(name="var_fixture", image_size=80,
                     tokenizer={"arch": _vqvae_arch(vq_fx), "checkpoint": str(files["vqvae"])},
                     teacher={"arch": teacher_arch, "checkpoint": str(files["teacher"])},
                     student={"arch": {}, "checkpoint": str(files["student"])})


def test_decoy_entry_gives_other_weights_and_outputs(student: VARDDStudent, vqvae: MultiScaleVQVAE, vq_fx: dict,
                                                     dd_fx: dict, files: dict[str, Path]) -> None:
    ema_state = dd_fx["checkpoint"]["trainer"]["ema_parameters"]
    spec = _fixture_spec(vq_fx, dd_fx, files)
    assert spec.student_arch == _student_arch(dd_fx, vq_fx)
    decoy = spec.build_student(vqvae.codebook(), init="checkpoint", checkpoint_key="trainer.var_wo_ddp")
    by_loader = load_weights(_student(dd_fx, vq_fx, vqvae), files["student"], kind="student",
                             key="trainer.var_wo_ddp")
    default = spec.build_student(vqvae.codebook(), init="checkpoint")  # EMA entry
    explicit = load_weights(_student(dd_fx, vq_fx, vqvae), files["student"], kind="student",
                            key="trainer.ema_parameters")
    for name, tensor in ema_state.items():
        assert torch.equal(default.state_dict()[name], tensor), name
        assert torch.equal(explicit.state_dict()[name], tensor), name
        assert torch.equal(decoy.state_dict()[name], by_loader.state_dict()[name]), name
        assert torch.equal(decoy.state_dict()[name], tensor) == (name not in DECOY_TENSORS), name
    case = dd_fx["outputs"]["per_t"]["t1"]
    inputs = dd_fx["inputs"]
    with torch.no_grad():
        ema_tokens, ema_logits = default(case["x_t"], inputs["labels"], case["t"])
        decoy_tokens, decoy_logits = decoy(case["x_t"], inputs["labels"], case["t"])
    assert_close(ema_tokens, case["forward_conti"], atol=ATOL_SEQ)
    assert_close(ema_logits, case["forward_logits"])
    assert max_diff(decoy_tokens, case["forward_conti"]) > 1e-2
    assert max_diff(decoy_logits, case["forward_logits"]) > 1e-2
    fewstep = dd_fx["outputs"]["fewstep"]["tlist_0_3_split3"]
    decoy_run = fewstep_sample(decoy, inputs["labels"], inputs["noise"], [0, 3], 3)
    assert max_diff(decoy_run.sequence, fewstep["final_sequence"]) > 1e-2


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_files_without_derived_buffers_load(kind: str, student: VARDDStudent, teacher: VARTransformer,
                                            vqvae: MultiScaleVQVAE, vq_fx: dict, teacher_fx: dict, dd_fx: dict,
                                            tmp_path: Path) -> None:
    """lvl_1L, attn_bias_for_masking and every zero_k_bias are completed from the model when a file has none of
    them; a missing real parameter (or only some of the buffers) still fails, naming the keys."""
    if kind == "student":
        full = dd_fx["checkpoint"]["trainer"]["ema_parameters"]
        wrap = lambda state: {"trainer": {"ema_parameters": state}}  # noqa: E731
        fresh = lambda: _student(dd_fx, vq_fx, vqvae)  # noqa: E731
        reference, real_param = student, "layerwise_n_d_embed.3.bias"
    else:
        full = teacher_fx["checkpoint"]
        wrap = lambda state: state  # noqa: E731
        fresh = lambda: build_teacher(**_teacher_arch(teacher_fx, vq_fx))  # noqa: E731
        reference, real_param = teacher, "blocks.2.attn.v_bias"
    derived = [k for k in full if _derived(k)]
    assert len(derived) == 2 + 3  # lvl_1L, the mask, one zero_k_bias per block
    stripped = {k: v for k, v in full.items() if not _derived(k)}
    model = load_weights(fresh(), _save(tmp_path, wrap(stripped), "stripped.pth"), kind=kind)
    for name, tensor in full.items():  # the completed buffers equal the official ones
        assert torch.equal(model.state_dict()[name], tensor), name
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    if kind == "student":
        case = dd_fx["outputs"]["per_t"]["tmixed_0_2_4"]
        with torch.no_grad():
            assert_close(model.final_predict(case["x_t"], dd_fx["inputs"]["labels"], case["t"])[1],
                         case["final_predict_logits"])
    else:
        with torch.no_grad():
            assert_close(model(teacher_fx["inputs"]["labels"], teacher_fx["inputs"]["x_BLCv_wo_first_l"]),
                         teacher_fx["outputs"]["tf_logits"])

    missing_param = {k: v for k, v in stripped.items() if k != real_param}
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {real_param}"):
        load_weights(fresh(), _save(tmp_path, wrap(missing_param), "missing.pth"), kind=kind)
    partial = {k: v for k, v in full.items() if k != "lvl_1L"}  # all-or-nothing: some buffers present
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): lvl_1L"):
        load_weights(fresh(), _save(tmp_path, wrap(partial), "partial.pth"), kind=kind)
