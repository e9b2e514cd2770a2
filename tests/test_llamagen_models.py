"""LlamaGen family beyond fixture parity: preset sizes, checkpoint layouts and errors, generation invariants."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch
import yaml

from dd.checkpoint import CheckpointError, read_checkpoint, resolve_reference
from dd.models.llamagen import (
    arch_from_official_args,
    build_student,
    build_teacher,
    generate,
    load_weights,
    make_spec,
)
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import per_sample_uniform

from conftest import REPO_ROOT, load_official


def _preset(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / "model" / f"{name}.yaml").read_text())


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,teacher_m,student_m", [("gpt_b", 110.9, 98.3), ("gpt_l", 342.9, 326.2)])
def test_official_parameter_counts_on_meta_device(name: str, teacher_m: float, student_m: float) -> None:
    cfg = _preset(name)
    teacher = build_teacher(device="meta", **cfg["teacher"]["arch"])
    student = build_student(device="meta", **cfg["teacher"]["arch"], **cfg["student"]["arch"])
    assert all(p.device.type == "meta" for p in teacher.parameters())
    assert round(_count(teacher) / 1e6, 1) == teacher_m
    assert round(_count(student) / 1e6, 1) == student_m
    # the student replaces the (V x dim) embedding by an (8 -> dim) projection and adds its own heads
    dim, vocab = cfg["teacher"]["arch"]["dim"], cfg["teacher"]["arch"]["vocab_size"]
    extra = dim * 8 + dim + 2 * dim + 2 * dim + dim * 8 + 8
    assert _count(student) == _count(teacher) - vocab * dim + extra


@pytest.fixture(scope="module")
def dd_fx() -> dict:
    return load_official("llamagen_dd.pt")


@pytest.fixture(scope="module")
def gpt_fx() -> dict:
    return load_official("llamagen_gpt.pt")


def _student(dd_fx: dict):
    return build_student(codebook=dd_fx["codebook"], **arch_from_official_args(dd_fx["config"], "student"))


def test_student_loads_ema_not_decoy(dd_fx: dict, tmp_path: Path) -> None:
    path = tmp_path / "dd.pt"
    torch.save(dd_fx["checkpoint"], path)
    ema = load_weights(_student(dd_fx), path, kind="student")
    decoy = load_weights(_student(dd_fx), path, kind="student", key="model")
    assert torch.equal(ema.n_d_embed.weight, dd_fx["checkpoint"]["ema"]["n_d_embed.weight"])
    assert not torch.equal(ema.n_d_embed.weight, decoy.n_d_embed.weight)


@pytest.mark.parametrize("wrap", ["raw", "module", "state_dict", "compiled_prefix", "with_args"])
def test_teacher_wrapper_layouts(gpt_fx: dict, tmp_path: Path, wrap: str) -> None:
    state = gpt_fx["checkpoint"]["model"]
    payload = {
        "raw": state,
        "module": {"module": state},
        "state_dict": {"state_dict": state},
        "compiled_prefix": {"model": {"_orig_mod." + k: v for k, v in state.items()}},
        "with_args": {"model": state, "args": argparse.Namespace(gpt_model="GPT-B"), "steps": 10},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    model = load_weights(build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher")), path, kind="teacher")
    assert torch.equal(model.output.weight, state["output.weight"])


def test_a_checkpoint_trained_at_another_resolution_is_refused(gpt_fx: dict, dd_fx: dict, tmp_path: Path) -> None:
    """No LlamaGen weight depends on the token grid, so only the training args tell a 384-px file from a 256-px one:
    a grid that is not the model's is refused (teacher and student), the model's own loads."""
    teacher = build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher"))
    grid = teacher.grid_size
    for model, state, kind in ((teacher, gpt_fx["checkpoint"]["model"], "teacher"),
                               (_student(dd_fx), dd_fx["checkpoint"]["ema"], "student")):
        assert model.grid_size == grid
        path = tmp_path / f"{kind}.pt"
        wrapper = "model" if kind == "teacher" else "ema"
        torch.save({wrapper: state, "args": argparse.Namespace(image_size=16 * (grid + 8), downsample_size=16)}, path)
        with pytest.raises(CheckpointError, match=f"image_size={16 * (grid + 8)} .*built for {grid} x {grid} tokens"):
            load_weights(model, path, kind=kind)
        torch.save({wrapper: state, "args": argparse.Namespace(image_size=16 * grid, downsample_size=16)}, path)
        load_weights(model, path, kind=kind)


def test_teacher_drops_stray_freqs_cis(gpt_fx: dict, tmp_path: Path) -> None:
    state = dict(gpt_fx["checkpoint"]["model"], freqs_cis=torch.zeros(26, 10, 2))
    path = tmp_path / "old.pt"
    torch.save({"model": state}, path)
    load_weights(build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher")), path, kind="teacher")


def test_student_file_loaded_as_teacher_names_the_cause(dd_fx: dict, gpt_fx: dict, tmp_path: Path) -> None:
    path = tmp_path / "dd.pt"
    torch.save(dd_fx["checkpoint"], path)
    teacher = build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher"))
    with pytest.raises(CheckpointError) as err:
        load_weights(teacher, path, kind="teacher", preset="gpt_fixture")
    text = str(err.value)
    assert "unexpected keys" in text and "n_d_embed.weight" in text
    assert "DD student checkpoint" in text and "gpt_fixture" in text


def test_wrong_preset_names_shape_mismatch(gpt_fx: dict, tmp_path: Path) -> None:
    path = tmp_path / "gpt.pt"
    torch.save(gpt_fx["checkpoint"], path)
    arch = dict(arch_from_official_args(gpt_fx["config"], "teacher"), n_layer=2)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): layers\.2\."):
        load_weights(build_teacher(**arch), path, kind="teacher")
    arch = dict(arch_from_official_args(gpt_fx["config"], "teacher"), dim=96, n_head=4)
    with pytest.raises(CheckpointError, match="wrong size: pick the preset"):
        load_weights(build_teacher(**arch), path, kind="teacher")


def test_tokenizer_file_as_teacher_and_missing_key(gpt_fx: dict, tmp_path: Path) -> None:
    vq = load_official("llamagen_vq.pt")
    path = tmp_path / "vq.pt"
    torch.save(vq["checkpoint"], path)
    with pytest.raises(CheckpointError, match="tokenizer file"):
        load_weights(build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher")), path, kind="teacher")
    with pytest.raises(CheckpointError, match=r"no state dict found under key 'ema'.*top-level entries: \['model'\]"):
        load_weights(build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher")), path, kind="teacher",
                     key="ema")


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        resolve_reference(tmp_path / "nope.pt")


def test_untrusted_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_hf_reference_offline_fails_fast_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        resolve_reference("hf://microsoft/distilled_decoding/LlamaGen-DD/llamagen-B.pt")
    assert time.monotonic() - start < 10
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "huggingface-cli download microsoft/distilled_decoding" in text
    assert "/path/to/llamagen-B.pt" in text
    with pytest.raises(CheckpointError, match=r"pass model\.student\.checkpoint=/path/to/llamagen-B\.pt"):
        resolve_reference("hf://microsoft/distilled_decoding/LlamaGen-DD/llamagen-B.pt", "model.student.checkpoint")
    with pytest.raises(CheckpointError, match="malformed reference"):
        resolve_reference("hf://only-org/file.pt")


def test_preset_spec_builds_and_validates() -> None:
    spec = make_spec(**_preset("gpt_b"))
    assert spec.name == "gpt_b" and spec.sampling.top_k == 8000 and spec.default_t_list == (0, 80)
    assert spec.student_arch["codebook_dim"] == 8 and spec.student_arch["n_layer"] == 12


def test_init_from_teacher_copies_trunk_and_heads(gpt_fx: dict, dd_fx: dict) -> None:
    teacher = build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher"))
    teacher.load_state_dict(gpt_fx["checkpoint"]["model"])
    student = _student(dd_fx)
    fresh_tok = student.tok_embeddings.weight.clone()
    student.init_from_teacher(teacher)
    for name, tensor in teacher.state_dict().items():
        if name != "tok_embeddings.weight":
            assert torch.equal(student.state_dict()[name], tensor), name
    assert torch.equal(student.tok_embeddings.weight, fresh_tok)


@pytest.fixture(scope="module")
def fixture_teacher(gpt_fx: dict):
    teacher = build_teacher(**arch_from_official_args(gpt_fx["config"], "teacher"))
    teacher.load_state_dict(gpt_fx["checkpoint"]["model"])
    return teacher.eval()


def test_kv_cache_generation_matches_teacher_forcing(fixture_teacher, gpt_fx: dict) -> None:
    labels = gpt_fx["inputs"]["labels"]
    config = SamplingConfig(cfg_scale=1.0)
    chooser = SeededMultinomialChooser(per_sample_uniform(range(4), 25))
    result = generate(fixture_teacher, labels, 25, config, chooser, record_logits=True)
    with torch.no_grad():
        forced = fixture_teacher(labels, result.tokens[:, :24])
    torch.testing.assert_close(result.step_logits.transpose(0, 1), forced, atol=1e-4, rtol=1e-5)


def test_seeded_sampling_is_batch_size_independent(fixture_teacher) -> None:
    config = SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9, temperature=1.1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    seeds = list(range(100, 106))
    full = generate(fixture_teacher, labels, 25, config, SeededMultinomialChooser(per_sample_uniform(seeds, 25)))
    parts = [generate(fixture_teacher, labels[i:i + 2], 25, config,
                      SeededMultinomialChooser(per_sample_uniform(seeds[i:i + 2], 25))).tokens for i in (0, 2, 4)]
    assert torch.equal(full.tokens, torch.cat(parts))
    other = generate(fixture_teacher, labels, 25, config, SeededMultinomialChooser(per_sample_uniform(range(6), 25)))
    assert not torch.equal(full.tokens, other.tokens)


def test_generation_supports_what_official_cannot(fixture_teacher) -> None:
    """Prefix without CFG, and exactly one new token (both fail in the official intermediate_generate)."""
    labels = torch.tensor([1, 2])
    prefix = torch.tensor([[3, 4, 5], [6, 7, 8]])
    greedy = SamplingConfig(cfg_scale=1.0, sample=False)
    from dd.sampling.choosers import greedy_chooser

    one = generate(fixture_teacher, labels, 1, greedy, greedy_chooser, prefix=prefix)
    assert one.tokens.shape == (2, 4) and torch.equal(one.tokens[:, :3], prefix)
    with torch.no_grad():
        expected = fixture_teacher(labels, prefix)[:, -1].argmax(-1)
    assert torch.equal(one.tokens[:, 3], expected)
    with pytest.raises(ValueError, match="exceed block_size"):
        generate(fixture_teacher, labels, 23, greedy, greedy_chooser, prefix=prefix)


def test_sampler_settings_are_validated_with_the_valid_range() -> None:
    from dd.sampling.dd_samplers import validate_split, validate_t_list, validate_teacher_start

    assert validate_t_list([0, 80], 256) == (0, 80)
    with pytest.raises(ValueError, match="must start with 0"):
        validate_t_list([5, 80], 256)
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_t_list([0, 80, 40], 256)
    with pytest.raises(ValueError, match=r"valid: 0\.\.255"):
        validate_t_list([0, 256], 256)
    with pytest.raises(ValueError, match=r"split_t=300 outside the valid range 0\.\.256"):
        validate_split(300, 256)
    assert validate_teacher_start(79, [0, 80]) == 79
    with pytest.raises(ValueError, match=r"teacher_start_t=80 outside the valid range 0\.\.79"):
        validate_teacher_start(80, [0, 80])
    with pytest.raises(ValueError, match="exactly two timesteps"):
        validate_teacher_start(10, [0, 40, 80])
