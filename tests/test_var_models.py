"""VAR family beyond fixture parity: preset sizes, checkpoint mismatch errors, offline ``hf://`` failure, generation
invariants on the random-weight ``var_test`` preset, student initialisation from the teacher, VAR's filter rule."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
import yaml

from dd.checkpoint import CheckpointError, save_state_dict
from dd.models.var import (
    VARFamily,
    VARSpec,
    build_student,
    build_teacher,
    load_weights,
    make_spec,
    student_from_teacher,
    var_filter_logits,
    var_generate,
)
from dd.models.var.vqvae import flat_to_scales
from dd.sampling.choosers import SeededMultinomialChooser, greedy_chooser
from dd.sampling.logits import SamplingConfig, filter_top_k_top_p
from dd.sampling.seeds import per_sample_normal, per_sample_uniform

from conftest import REPO_ROOT


def _spec(name: str) -> VARSpec:
    return make_spec(**yaml.safe_load((REPO_ROOT / "configs" / "model" / f"{name}.yaml").read_text()))


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# -- preset sizes --------------------------------------------------------------------------------------------------
#: (preset, measured teacher M, published teacher M, measured student M or None, published student M or None).
#: Published: upstream VAR 310M / 600M / 1.03B / 2.0B; DD paper Table 1 327M / 635M / 1.09B (no d30 student).
PRESET_SIZES = [
    ("var_d16", 310.28, 310.0, 328.17, 327.0),
    ("var_d20", 600.92, 600.0, 635.40, 635.0),
    ("var_d24", 1033.40, 1030.0, 1092.48, 1090.0),
    ("var_d30", 2010.02, 2000.0, None, None),
]


@pytest.mark.parametrize("name,teacher_m,teacher_pub,student_m,student_pub", PRESET_SIZES)
def test_preset_parameter_counts_on_meta_device(name: str, teacher_m: float, teacher_pub: float,
                                                student_m: float | None, student_pub: float | None) -> None:
    spec = _spec(name)
    assert spec.name == name and spec.num_timesteps == 10 and spec.sequence_length == 680
    teacher = build_teacher(device="meta", **spec.teacher_arch)
    assert all(p.device.type == "meta" for p in teacher.parameters())
    assert abs(_millions(teacher) - teacher_m) < 0.01
    assert abs(_millions(teacher) - teacher_pub) / teacher_pub < 0.01
    student = build_student(device="meta", **spec.student_arch)
    if student_m is None:  # no released d30 student; its shape still builds
        assert spec.student.checkpoint is None
        return
    assert abs(_millions(student) - student_m) < 0.01
    assert abs(_millions(student) - student_pub) / student_pub < 0.01
    # what the student adds: one sos scale (a level row and a position row), n_d embeddings, depth + 1 layer-wise
    # C x C linears, the continuous head (scale/shift table + C -> Cvae)
    c, cvae, depth = spec.teacher_arch["embed_dim"], spec.teacher_arch["z_channels"], spec.teacher_arch["depth"]
    extra = 2 * c + 2 * c + (depth + 1) * (c * c + c) + 2 * c + c * cvae + cvae
    assert sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in teacher.parameters()) == extra


def test_data_length_table_of_the_ten_scale_presets() -> None:
    spec = _spec("var_d16")
    vqvae, teacher, student = spec.meta_models()  # shapes only: no weights, no download
    family = spec.make_family(vqvae, teacher)
    table = (0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680)
    assert family.num_timesteps == 10 and family.sequence_length == 680 and family.token_dim == 32
    assert tuple(family.data_length(t) for t in range(11)) == table
    assert tuple(student.num_data_tokens(torch.arange(11)).tolist()) == table
    assert student.noise_mask.shape == (10, 680)
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="outside"):
            family.data_length(bad)


# -- checkpoint mismatch errors --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def var_test() -> VARSpec:
    return _spec("var_test")


@pytest.fixture(scope="module")
def family(var_test: VARSpec) -> VARFamily:
    return var_test.build_family()  # random:<seed> weights


@pytest.fixture(scope="module")
def var_test_files(var_test: VARSpec, family: VARFamily, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """var_test's VQVAE and teacher as raw state dicts, and a student in the VAR-DD export layout."""
    directory = tmp_path_factory.mktemp("var_test_files")
    student = var_test.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    vqvae = directory / "vae.pth"
    teacher = directory / "var.pth"
    torch.save(family.tokenizer.state_dict(), vqvae)
    torch.save(family.teacher.state_dict(), teacher)
    dd = save_state_dict(student.state_dict(), directory / "var_dd.pth", wrapper="trainer.ema_parameters",
                         extra={"trainer.var_wo_ddp": student.state_dict()})
    return {"vqvae": vqvae, "teacher": teacher, "student": dd}


def test_round_trip_of_var_test_files(var_test: VARSpec, family: VARFamily, var_test_files: dict[str, Path]) -> None:
    teacher = load_weights(build_teacher(**var_test.teacher_arch), var_test_files["teacher"], kind="teacher")
    student = load_weights(build_student(codebook=family.codebook(), **var_test.student_arch),
                           var_test_files["student"], kind="student")
    assert torch.equal(teacher.head.weight, family.teacher.head.weight)
    assert torch.equal(student.head.weight, family.teacher.head.weight)
    assert set(torch.load(var_test_files["student"], weights_only=True)) == {"trainer"}


def test_teacher_file_loaded_as_student(var_test: VARSpec, family: VARFamily,
                                        var_test_files: dict[str, Path]) -> None:
    student = build_student(codebook=family.codebook(), **var_test.student_arch)
    with pytest.raises(CheckpointError) as err:
        load_weights(student, var_test_files["teacher"], kind="student", preset="var_test")
    text = str(err.value)
    assert "missing keys" in text and "final_layer_conti.linear.weight" in text
    assert "shape mismatches" in text and "lvl_embed.weight" in text  # one level / slot fewer than a student
    assert "this is a teacher" in text and "var_test" in text


def test_student_file_loaded_as_teacher_is_refused(var_test: VARSpec, var_test_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="trainer"):
        load_weights(build_teacher(**var_test.teacher_arch), var_test_files["student"], kind="teacher")
    # with the entry named, the key diagnosis says what the file is
    with pytest.raises(CheckpointError, match="DD student checkpoint"):
        load_weights(build_teacher(**var_test.teacher_arch), var_test_files["student"], kind="teacher",
                     key="trainer.ema_parameters")


def test_student_file_loaded_as_teacher_names_the_cause(var_test: VARSpec, var_test_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="DD student"):
        load_weights(build_teacher(**var_test.teacher_arch), var_test_files["student"], kind="teacher")


@pytest.mark.parametrize("depth,pattern", [(3, r"missing keys \(\d+\): blocks\.2\."),
                                           (1, r"unexpected keys \(\d+\): blocks\.1\.")])
def test_teacher_file_in_a_preset_of_other_depth(var_test: VARSpec, var_test_files: dict[str, Path], depth: int,
                                                 pattern: str) -> None:
    arch = dict(var_test.teacher_arch, depth=depth)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_weights(build_teacher(**arch), var_test_files["teacher"], kind="teacher", preset="var_other")
    assert "wrong preset (different depth" in str(err.value)


def test_tokenizer_file_given_as_teacher(var_test: VARSpec, var_test_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"unexpected keys .*decoder\.") as err:
        load_weights(build_teacher(**var_test.teacher_arch), var_test_files["vqvae"], kind="teacher")
    assert "tokenizer file" in str(err.value)
    with pytest.raises(CheckpointError, match="tokenizer file"):
        load_weights(var_test.build_tokenizer(load=False), var_test_files["teacher"], kind="tokenizer")


def test_hf_reference_offline_fails_fast_with_hint() -> None:
    """Offline (HF_HUB_OFFLINE=1, set by conftest) an ``hf://`` reference fails at once: no network wait, no retries.

    The 2 s bound is timed with the 109M-parameter VQVAE built on the meta device, so that it measures the failure
    path and not the allocation of the model (about 0.5-1 s on CPU, more on a loaded machine); the real CPU build
    fails with the same error."""
    import huggingface_hub  # noqa: F401  (the lazy import is not what is timed)

    spec = _spec("var_d16")
    assert spec.tokenizer.checkpoint.startswith("hf://")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err, torch.device("meta"):
        spec.build_tokenizer()
    assert time.monotonic() - start < 2.0
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "hf://FoundationVision/var/vae_ch160v4096z32.pth" in text
    assert "pass model.tokenizer.checkpoint=/path/to/vae_ch160v4096z32.pth" in text
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="model.tokenizer.checkpoint="):
        spec.build_tokenizer()  # the reference is resolved before the 109M-parameter model is built
    assert time.monotonic() - start < 2.0


# -- generation invariants (random weights) --------------------------------------------------------------------------
def test_seeded_sampling_is_batch_size_independent(family: VARFamily, var_test: VARSpec) -> None:
    sampling = var_test.sampling
    assert sampling.cfg_scale == 1.5 and family.num_timesteps == 4 and family.sequence_length == 30
    labels = torch.tensor([0, 1, 2, 3, 1])
    seeds = [40, 41, 42, 43, 44]

    def run(rows: slice, seed_list: list[int]) -> torch.Tensor:
        chooser = SeededMultinomialChooser(per_sample_uniform(seed_list, family.sequence_length))
        return family.teacher_generate(labels[rows], 0, family.num_timesteps, None, sampling, chooser)

    batch = run(slice(None), seeds)
    alone = run(slice(3, 4), seeds[3:4])
    assert batch.shape == (5, 30) and alone.shape == (1, 30)
    assert torch.equal(batch[3:4], alone)
    assert torch.equal(batch[1:3], run(slice(1, 3), seeds[1:3]))
    assert not torch.equal(batch, run(slice(None), [s + 100 for s in seeds]))  # the seeds do matter
    assert len(set(batch.flatten().tolist())) > 20  # not a degenerate constant sequence


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_kv_cache_generation_matches_teacher_forcing(family: VARFamily, cfg: float) -> None:
    teacher, vqvae = family.teacher, family.tokenizer
    labels = torch.tensor([0, 1, 2, 3])
    result = var_generate(teacher, vqvae, labels, SamplingConfig(cfg_scale=cfg), greedy_chooser, record_logits=True)
    x = vqvae.indices_to_var_input(flat_to_scales(result.indices, vqvae.patch_nums))
    with torch.no_grad():
        cond = teacher(labels, x)
        uncond = teacher(torch.full_like(labels, teacher.null_class), x)
    forced = [(1 + cfg * si / 3) * cond[:, b:e] - cfg * si / 3 * uncond[:, b:e]
              for si, (b, e) in enumerate(teacher.scale_slices)]
    torch.testing.assert_close(torch.cat(result.step_logits, dim=1), torch.cat(forced, dim=1), atol=2e-4, rtol=1e-5)
    if cfg == 0:  # greedy ids are the argmax of teacher forcing on their own teacher-forcing input
        assert torch.equal(cond.argmax(dim=-1), result.indices)
    assert torch.equal(torch.cat(forced, dim=1).argmax(dim=-1), result.indices)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_block_causal_prefix_continuation_reproduces_generation(family: VARFamily, var_test: VARSpec,
                                                                cfg: float) -> None:
    """With the training mask over the prefix, continuing a generation from any of its prefixes is the same
    generation (greedy); the official unmasked prefix reads the prefix differently."""
    sampling = SamplingConfig(cfg_scale=cfg)
    labels = torch.tensor([0, 1, 2, 3])
    full = family.teacher_generate(labels, 0, family.num_timesteps, None, sampling, greedy_chooser)
    prefix = family.codebook()[full]  # continuous tokens, snapped back by the family
    causal = VARFamily(family.tokenizer, family.teacher, prefix_attention="block_causal")
    assert dataclasses.replace(var_test, prefix_attention="block_causal").make_family(
        family.tokenizer, family.teacher).prefix_attention == "block_causal"
    for start in range(1, family.num_timesteps):
        again = causal.teacher_generate(labels, start, family.num_timesteps, prefix, sampling, greedy_chooser)
        assert torch.equal(again, full), start
    # bidirectional: the logits of the first generated scale move (ids may or may not change)
    for start in range(1, family.num_timesteps):
        n = family.data_length(start)
        logits = {attention: var_generate(family.teacher, family.tokenizer, labels, sampling, greedy_chooser,
                                          start_scale=start, end_scale=start + 1, prefix=full[:, :n],
                                          prefix_attention=attention, record_logits=True).step_logits[0]
                  for attention in ("block_causal", "bidirectional")}
        assert (logits["block_causal"] - logits["bidirectional"]).abs().max() > 1e-3, start
    with pytest.raises(ValueError, match="prefix_attention"):
        VARFamily(family.tokenizer, family.teacher, prefix_attention="causal")
    with pytest.raises(ValueError, match="needs a prefix"):
        family.teacher_generate(labels, 2, 4, None, sampling, greedy_chooser)


# -- student initialisation from the teacher ----------------------------------------------------------------------
def test_student_init_from_teacher(family: VARFamily, var_test: VARSpec) -> None:
    teacher = family.teacher
    student = student_from_teacher(teacher, codebook=family.codebook(), **var_test.student_arch).eval()
    for name in ("word_embed", "class_emb", "blocks", "head_nm", "head"):
        own = getattr(student, name).state_dict()
        for key, tensor in getattr(teacher, name).state_dict().items():
            assert torch.equal(own[key], tensor), f"{name}.{key}"
    assert torch.equal(student.pos_start, teacher.pos_start)
    # one extra leading scale: student level / slot 0 = teacher's 0, student 2.. = teacher 1..; row 1 is fresh
    assert student.lvl_embed.weight.shape[0] == teacher.lvl_embed.weight.shape[0] + 1
    assert torch.equal(student.lvl_embed.weight[0], teacher.lvl_embed.weight[0])
    assert torch.equal(student.lvl_embed.weight[2:], teacher.lvl_embed.weight[1:])
    assert student.pos_1LC.shape[1] == teacher.pos_1LC.shape[1] + 1
    assert torch.equal(student.pos_1LC[0, 0], teacher.pos_1LC[0, 0])
    assert torch.equal(student.pos_1LC[0, 2:], teacher.pos_1LC[0, 1:])
    assert not torch.equal(student.pos_1LC[0, 1], teacher.pos_1LC[0, 1])
    assert len(student.layerwise_n_d_embed) == teacher.depth + 1
    for layer in student.layerwise_n_d_embed:
        assert not layer.weight.any() and not layer.bias.any()
    assert student.n_d_embed.weight.abs().sum() > 0
    assert torch.equal(student.codebook, family.codebook())
    # the spec path gives the same trunk
    via_spec = var_test.build_student(family.codebook(), init="teacher", teacher=teacher)
    assert torch.equal(via_spec.blocks[0].attn.mat_qkv.weight, teacher.blocks[0].attn.mat_qkv.weight)

    labels = torch.tensor([0, 1, 2, 3])
    seeds = [0, 1, 2, 3]
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim))
    ids = torch.randint(family.codebook().shape[0], (4, 30), generator=torch.Generator().manual_seed(0))
    data = family.codebook()[ids]
    for t in (0, 2, torch.tensor([0, 1, 2, 3])):
        x_t = student.perturb(data, t, noise)
        with torch.no_grad():
            tokens, logits = student(x_t, labels, t)
            final_tokens, final_logits = student.final_predict(x_t, labels, t)
        assert tokens.shape == (4, 30, family.token_dim) and logits.shape == (4, 30, family.codebook().shape[0])
        assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()
        assert torch.isfinite(final_tokens).all()
        given = student.num_data_tokens(t).expand(4)
        for b in range(4):
            assert torch.isfinite(final_logits[b, given[b]:]).all()
            assert torch.equal(final_tokens[b, :given[b]], data[b, :given[b]])
        assert torch.isfinite(student.final_sequence(final_tokens, final_logits, 2)).all()


# -- VAR's top-k / top-p filter ------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (0, 0.1), (10, 0.8), (5, 0.3), (20, 1.0), (0, 1.0),
                                         (100, 0.95)])
def test_var_filter_equals_llamagen_filter_away_from_ties(top_k: int, top_p: float) -> None:
    logits = torch.randn(256, 64, generator=torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))) * 2.5
    kept = logits.clone()
    var = var_filter_logits(logits, top_k, top_p)
    llamagen = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(logits, kept)  # out of place
    assert torch.equal(var, llamagen)
    # the largest entry always survives, with its value
    best = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(var.gather(-1, best), logits.gather(-1, best))
    survivors = torch.isfinite(var).sum(dim=-1)
    if top_k:
        assert survivors.max() <= min(top_k, 64)
    if top_p < 1.0:
        assert survivors.min() >= 1 and survivors.float().mean() < 64


def test_var_top_p_keeps_the_largest_token_and_differs_only_at_ties() -> None:
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(3))
    for top_p in (1e-6, 1e-3):
        only = var_filter_logits(logits, 0, top_p)
        assert torch.equal(torch.isfinite(only).sum(dim=-1), torch.ones(32, dtype=torch.long))
        assert torch.equal(only.argmax(dim=-1), logits.argmax(dim=-1))
    # an exact boundary: four equal probabilities and top_p = 0.5. VAR removes entries whose ascending cumulative
    # probability is <= 1 - top_p (two remain); LlamaGen keeps the token that crosses top_p (three remain)
    tie = torch.zeros(1, 4)
    assert torch.isfinite(var_filter_logits(tie, 0, 0.5)).sum() == 2
    assert torch.isfinite(filter_top_k_top_p(tie, 0, 0.5)).sum() == 3
