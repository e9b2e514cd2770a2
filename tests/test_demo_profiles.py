"""scripts/demo.py profiles: sizes per preset, command-line sizes win; the tiny presets' study-chosen recipe
(docs/distillation_study.md) is what `python -m dd.train` composes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from test_pairs import compose_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import demo  # noqa: E402


def _args(profile: str, **sizes: int | None) -> argparse.Namespace:
    return argparse.Namespace(profile=profile, pairs=sizes.get("pairs"), steps=sizes.get("steps"),
                              batch=sizes.get("batch"))


@pytest.mark.parametrize("profile", sorted(demo.PROFILES))
def test_every_profile_sizes_both_bundled_families(profile: str) -> None:
    for model in ("gpt_tiny", "var_tiny"):
        size = demo._sizes(_args(profile), model)
        assert size.pairs >= 1000 and size.steps >= 100 and size.batch >= 1
    long, default = demo.PROFILES["long"], demo.PROFILES["default"]
    assert all(long[m]["steps"] > default[m]["steps"] for m in default)


def test_command_line_sizes_win_and_unknown_presets_fall_back() -> None:
    size = demo._sizes(_args("long", steps=10), "gpt_tiny")
    assert (size.pairs, size.steps) == (demo.PROFILES["long"]["gpt_tiny"]["pairs"], 10)
    assert vars(demo._sizes(_args("default"), "gpt_test")) == demo.FALLBACK_SIZES


def test_tiny_presets_train_with_the_study_recipe_and_others_keep_theirs() -> None:
    gpt = compose_cfg("train", ["model=gpt_tiny"])
    assert gpt["schedule"] == {"t_list": [0, 48], "split_t": 64} and gpt["optim"]["lr"] == 2e-3
    assert compose_cfg("train", ["model=var_tiny"])["optim"]["lr"] == 2e-3
    assert compose_cfg("train", ["model=gpt_b"])["optim"]["lr"] == 3e-4
    assert compose_cfg("train", ["model=gpt_tiny", "optim.lr=1e-4"])["optim"]["lr"] == 1e-4


def test_dd2_method_uses_its_own_profiles_without_pairs() -> None:
    args = _args("default")
    args.method = "dd2"
    for model in ("gpt_tiny", "var_tiny"):
        size = demo._sizes(args, model)
        assert size.pairs == 0 and size.steps == demo.DD2_PROFILES["default"][model]["steps"]
    assert sorted(demo.DD2_PROFILES) == sorted(demo.PROFILES)
