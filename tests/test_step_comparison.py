"""dd.evaluation.step_comparison (1-step vs t_list sampling on held-out pairs) and scripts/compare_steps.py, on both
families' random-weight test presets: the comparison recomputed by hand from the samplers and teacher forcing,
independent of batching, and the script run on real pairs. The VAR result itself is asserted in
tests/test_var_bundled.py (slow)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dd.evaluation.step_comparison import compare_steps
from dd.generate_pairs import run as run_pairs
from dd.models.presets import spec_from_yaml
from dd.sampling.dd_samplers import fewstep_sample

from conftest import REPO_ROOT, export_teacher_initialised_student
from test_pairs import compose_cfg

PRESETS = ("gpt_test", "var_test")


def _setup(preset: str, batch: int = 6):
    spec = spec_from_yaml(REPO_ROOT / "configs" / "model" / f"{preset}.yaml")
    torch.manual_seed(0)
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher).eval()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(family.num_classes, (batch,), generator=generator)
    noise = torch.randn(batch, family.sequence_length, family.token_dim, generator=generator)
    ids = torch.randint(int(family.codebook().shape[0]), (batch, family.sequence_length), generator=generator)
    return spec, family, student, labels, noise, ids


@pytest.mark.parametrize("preset", PRESETS)
def test_comparison_equals_its_definition_and_ignores_batching(preset: str) -> None:
    spec, family, student, labels, noise, ids = _setup(preset)
    t_list, split = list(spec.default_t_list), spec.default_split_t
    result = compare_steps(student, family, spec.sampling, labels, noise, ids, t_list, split)
    rest = family.data_length(t_list[1])
    assert result.rest_start == rest and result.t2 == t_list[1] and result.num_samples == len(labels)
    one = student.nearest_indices(fewstep_sample(student, labels, noise, [0], split).sequence)
    two = student.nearest_indices(fewstep_sample(student, labels, noise, t_list, split).sequence)
    assert result.prefix_kept == torch.equal(one[:, :rest], two[:, :rest]) and result.prefix_kept
    assert result.acc_1step == pytest.approx((one == ids)[:, rest:].float().mean().item())
    assert result.acc_2step == pytest.approx((two == ids)[:, rest:].float().mean().item())
    with torch.no_grad():
        log_probs = family.teacher_log_probs(labels, two, spec.sampling)
    nll = -log_probs.gather(-1, two[..., None])[..., 0][:, rest:].mean(1)
    assert result.nll_2step == pytest.approx(nll.mean().item(), rel=1e-5)
    given = student.final_predict(student.perturb(family.codebook()[ids], t_list[1], noise), labels, t_list[1])[1]
    assert result.acc_given == pytest.approx((given.argmax(-1) == ids)[:, rest:].float().mean().item())
    split_run = compare_steps(student, family, spec.sampling, labels, noise, ids, t_list, split, batch_size=4)
    for key, value in result.as_dict().items():
        assert split_run.as_dict()[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_comparison_refuses_a_single_step_schedule() -> None:
    spec, family, student, labels, noise, ids = _setup("var_test", batch=2)
    for t_list in ([0], [1, 3]):
        with pytest.raises(ValueError, match=r"need \[0, t2"):
            compare_steps(student, family, spec.sampling, labels, noise, ids, t_list, spec.default_split_t)


def _script():
    """scripts/compare_steps.py as a module."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import compare_steps as script
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    return script


@pytest.mark.parametrize("preset", PRESETS)
def test_compare_steps_script_on_generated_pairs(preset: str, tmp_path, capsys) -> None:
    run_pairs(compose_cfg("generate_pairs", [f"model={preset}", "num_pairs=8", "shard_size=8",
                                             f"output_dir={tmp_path / 'held'}", "seed_base=1000000"]))
    export = export_teacher_initialised_student(preset, tmp_path / "student.pt")
    script = _script()
    result = script.main(["--model", preset, "--student", str(export), "--pairs", str(tmp_path / "held" / "pairs"),
                          "--limit", "6", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "6 held-out pairs" in out and "| teacher NLL given own prefix" in out
    assert json.loads((tmp_path / "r.json").read_text()) == result and result["num_samples"] == 6
    assert result["prefix_kept"]


def test_comparison_refuses_a_second_timestep_at_the_end() -> None:
    spec, family, student, labels, noise, ids = _setup("gpt_test", batch=2)
    with pytest.raises(ValueError, match="leaves nothing to compare"):
        compare_steps(student, family, spec.sampling, labels, noise, ids, [0, family.num_timesteps],
                      spec.default_split_t)
    with pytest.raises(ValueError, match="same number"):
        compare_steps(student, family, spec.sampling, labels[:1], noise, ids, spec.default_t_list,
                      spec.default_split_t)


def test_compare_steps_script_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=4", "shard_size=4",
                                             f"output_dir={tmp_path / 'held'}"]))
    export = export_teacher_initialised_student("var_test", tmp_path / "student.pt")
    script = _script()
    base = ["--model", "var_test", "--student", str(export)]
    for extra, message in ((["--pairs", str(tmp_path / "held" / "pairs")], "pairs"),  # gpt_test pairs for var_test
                           (["--pairs", str(tmp_path / "nowhere")], "nowhere")):  # no pairs at all
        with pytest.raises(SystemExit) as exit_info:
            script.main(base + extra)
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's "<prog>: error: <message>"
        assert "error:" in last and message in last, last
    with pytest.raises(SystemExit):  # a student file that is not there
        script.main(["--model", "var_test", "--student", str(tmp_path / "missing.pt"), "--pairs", str(tmp_path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and "missing.pt" in last, last
