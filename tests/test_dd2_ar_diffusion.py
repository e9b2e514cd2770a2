"""DD2's ``method.generator_init=ar_diffusion``: when GTS ends, the generator's teacher-copied weights take the
fine-tuned AR-diffusion (guidance) trunk's, through the family's ``student_weights_from_trunk``, for both families.

The mapping is checked against DD's own initialisation from a teacher whose trunk is the fine-tuned one; the trainer
against the checkpoint at the GTS boundary (generator and EMA), and against resumption on either side of it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dd.checkpoint import load_entries
from dd.train import run as run_train

from test_dd2 import _dd2_overrides, preset  # noqa: F401  (preset: the both-families fixture)
from test_pairs import build_spec, compose_cfg

AR_DIFFUSION = {"method.generator_init": "ar_diffusion"}


def _built(preset: str):  # noqa: F811
    spec = build_spec(compose_cfg("train", [f"model={preset}"]))
    return spec, spec.build_family()


def _teacher_initialised(spec, family, seed: int = 0, teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)  # the parts DD's initialisation does not take from the teacher are drawn afresh
    return spec.build_student(family.codebook(), init="teacher", teacher=teacher or family.teacher)


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_trunk_weights_give_dd_initialisation_from_the_fine_tuned_trunk(preset: str) -> None:  # noqa: F811
    """Copying a (perturbed, as by GTS) trunk into a teacher-initialised student gives exactly the student DD's
    initialisation makes from a teacher whose weights are the trunk's (logits head: the teacher's own); an
    untouched trunk (the teacher's copy) changes nothing."""
    spec, family = _built(preset)
    student = _teacher_initialised(spec, family)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trunk = family.feature_trunk()
    untouched = family.student_weights_from_trunk(student, trunk)
    assert untouched and set(untouched) <= set(before)
    for name, value in untouched.items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        for param in trunk.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    load_entries(student, family.student_weights_from_trunk(student, trunk), what="student")

    fine_tuned = copy.deepcopy(family.teacher)
    load_entries(fine_tuned, trunk.model.state_dict(), what="teacher")  # every trunk entry is a teacher entry
    reference = _teacher_initialised(spec, family, teacher=fine_tuned).state_dict()
    after = student.state_dict()
    assert set(after) == set(reference)
    for name in reference:
        assert torch.equal(after[name], reference[name]), name
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    parameters = {name for name, _ in student.named_parameters()}
    assert changed == set(untouched) & parameters  # every parameter the trunk provides moved, nothing else did


def test_generator_and_ema_take_the_guidance_trunk_when_gts_ends(preset: str, tmp_path: Path) -> None:  # noqa: F811
    run_train(compose_cfg("train", _dd2_overrides(tmp_path, preset, max_steps=4, ckpt_every=4, **AR_DIFFUSION)))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]  # step 4 = gts_steps
    spec, family = _built(preset)
    student, trunk = _teacher_initialised(spec, family), family.feature_trunk()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(_under(state, "student."))
    trunk.load_state_dict(_under(state, "fake.trunk."))
    weights = family.student_weights_from_trunk(student, trunk)
    generator, ema = _under(state, "student."), _under(state, "ema.shadow.")
    for name, value in weights.items():
        torch.testing.assert_close(generator[name], value, rtol=0, atol=0, msg=name)
    assert set(ema) == set(generator)
    for name in generator:  # no EMA update yet: the shadow is the re-initialised generator
        torch.testing.assert_close(ema[name], generator[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(generator[k], initial[k]) for k in weights)  # GTS moved the trunk, the copy followed


def test_ar_diffusion_init_resumes_on_either_side_of_the_gts_boundary(preset: str, tmp_path: Path) -> None:  # noqa: F811
    """Stopped before the boundary (step 3 of gts_steps 4), the resumed run copies when it gets there; stopped after
    it (step 5), the checkpoint holds the copied weights and nothing is copied again: both end where an
    uninterrupted run does (every weight of the task, guidance network included)."""
    settings = {**AR_DIFFUSION, "method.noise_pool": 64, "ckpt_every": 1}

    def train(out: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
        run_train(compose_cfg("train", _dd2_overrides(out, preset, max_steps=steps, **settings) + list(extra)))
        return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    straight = train(tmp_path / "straight", 7)
    for stop in (3, 5):
        out = tmp_path / f"stopped_at_{stop}"
        assert int(train(out, stop)["batches_seen"]) == stop
        resumed = train(out, 7, "resume=auto")
        assert set(resumed) == set(straight)
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-6, msg=f"{stop}: {name}")


def test_a_misspelt_generator_init_is_refused_naming_the_choices(tmp_path: Path) -> None:
    """``ar-diffusion`` (a typo) is neither an initialisation nor a file: refused before anything is built, with the
    accepted values; an existing export path passes the check."""
    from dd.runs import ConfigError
    from dd.tasks.dd2 import dd2_config
    from dd.train import run as run_train

    with pytest.raises(ConfigError, match=r"generator_init='ar-diffusion'.*teacher, ar_diffusion.*path"):
        run_train(compose_cfg("train", _dd2_overrides(tmp_path, "gpt_test", **{"method.generator_init": "ar-diffusion"})))
    assert not (tmp_path / "checkpoints").exists()
    export = tmp_path / "student.pt"
    export.write_bytes(b"")
    method = compose_cfg("train", ["method=dd2"])["method"]
    for value in ("teacher", "ar_diffusion", str(export), "hf://org/repo/student.pt"):
        dd2_config({**method, "generator_init": value})


def test_gradient_accumulation_is_refused_for_dd2_before_training(tmp_path: Path) -> None:
    from dd.runs import ConfigError

    with pytest.raises(ConfigError, match=r"accumulate_grad_batches=4 cannot apply.*batch_size"):
        run_train(compose_cfg("train", [*_dd2_overrides(tmp_path, "gpt_test"), "accumulate_grad_batches=4"]))
    assert not (tmp_path / "checkpoints").exists()
