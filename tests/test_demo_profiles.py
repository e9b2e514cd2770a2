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


def test_dd_then_dd2_uses_its_own_profiles_and_command_line_sizes_win() -> None:
    args = _args("default")
    args.method, args.dd2_steps = "dd+dd2", None
    for model in ("gpt_tiny", "var_tiny"):
        size = demo._sizes(args, model)
        assert vars(size) == demo.DD_DD2_PROFILES["default"][model]
        assert size.pairs >= 1000 and size.dd2_steps >= 100 and size.dd2_batch == 8
    # var_tiny: DD's share is cut so that DD + DD2 take about the DD demo's time (a DD2 step of 8 ~ 1/3 DD step of 64)
    var, dd = demo.DD_DD2_PROFILES["default"]["var_tiny"], demo.PROFILES["default"]["var_tiny"]
    assert var["pairs"] == dd["pairs"] and var["steps"] < dd["steps"]
    args.steps, args.dd2_steps = 7, 5
    size = demo._sizes(args, "gpt_test")  # no profile entry: the fallbacks, command-line sizes still win
    assert (size.pairs, size.steps, size.dd2_steps, size.dd2_batch) == (demo.FALLBACK_SIZES["pairs"], 7, 5, 8)
    assert sorted(demo.DD_DD2_PROFILES) == sorted(demo.PROFILES)
    assert demo.DD2_FINETUNE[0] == "method=dd2" and "method.code_draw=gumbel" in demo.DD2_FINETUNE


def test_dd2_phase_options_are_refused_for_the_other_methods() -> None:
    import subprocess

    done = subprocess.run([sys.executable, str(Path(demo.__file__).resolve()), "--method", "dd", "--dd2-steps", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dd2-steps and --dd2-override are for --method dd+dd2" in done.stderr
    for extra, message in ((["--method", "dd2", "--teacher-start", "8"], "only --method dd evaluates"),
                           (["--method", "dd2", "--pairs", "100"], "trains without pairs")):
        done = subprocess.run([sys.executable, str(Path(demo.__file__).resolve()), *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_parallel_family_gets_every_setting_of_the_command_line() -> None:
    """--jobs runs each family as ``demo.py --worker --models <family>``: sizes, samples, method, curve points,
    teacher start, output folder and train overrides are all passed on (a dropped one would silently change that
    family's run)."""
    parser_args = argparse.Namespace(profile="long", pairs=123, steps=45, batch=16, samples=77, method="dd2",
                                     curve_points=3, teacher_start=5, out="outputs/x",
                                     train_overrides=["optim.lr=1e-3", "ema_decay=0.99"], dd2_steps=33,
                                     dd2_overrides=["method.lr_fake=1e-4"])
    command = demo._worker_command("var_tiny", parser_args, threads=2)
    assert command[:2] == [sys.executable, str(Path(demo.__file__).resolve())]
    flags = dict(zip(command[2:], command[3:]))
    assert "--worker" in command and flags["--jobs"] == "1" and flags["--models"] == "var_tiny"
    expected = {"--profile": "long", "--pairs": "123", "--steps": "45", "--batch": "16", "--samples": "77",
                "--method": "dd2", "--curve-points": "3", "--teacher-start": "5", "--out": "outputs/x",
                "--threads": "2", "--dd2-steps": "33"}
    assert {k: flags[k] for k in expected} == expected
    overrides = [command[i + 1] for i, item in enumerate(command) if item == "--train-override"]
    assert overrides == ["optim.lr=1e-3", "ema_decay=0.99"]
    assert [command[i + 1] for i, item in enumerate(command) if item == "--dd2-override"] == ["method.lr_fake=1e-4"]
    defaults = argparse.Namespace(profile="default", pairs=None, steps=None, batch=None, samples=1000, method="dd",
                                  curve_points=None, teacher_start=None, out="o", train_overrides=[])
    assert not {"--pairs", "--steps", "--batch", "--curve-points", "--teacher-start"} & set(
        demo._worker_command("gpt_tiny", defaults, 1)) and "--dd2-steps" not in demo._worker_command("gpt_tiny", defaults, 1)


def test_last_line_reads_the_newest_progress_bar_state(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    assert demo._last_line(log) == "starting"
    log.write_text("pairs: 10/100\rpairs: 50/100\rpairs: 100/100\ntrain: 3/800 step\r\n")
    assert demo._last_line(log) == "train: 3/800 step"


@pytest.mark.slow
def test_parallel_demo_gives_the_sequential_results(tmp_path: Path) -> None:
    """Both bundled families at toy sizes, one process each (``--jobs 2``), then gpt_tiny alone in this process: the
    same metrics (every draw is seeded per sample, one torch thread each), one summary with both families."""
    import json
    import subprocess

    sizes = ["--pairs", "64", "--steps", "3", "--batch", "16", "--samples", "32", "--threads", "1"]
    script = str(Path(demo.__file__).resolve())
    parallel = subprocess.run([sys.executable, script, "--jobs", "2", "--out", str(tmp_path / "par"), *sizes],
                              capture_output=True, text=True, timeout=900)
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    summary = (tmp_path / "par" / "results.md").read_text()
    assert "### gpt_tiny" in summary and "### var_tiny" in summary and "2 job(s)" in summary
    assert summary.index("### gpt_tiny") < summary.index("### var_tiny")
    sequential = subprocess.run([sys.executable, script, "--jobs", "1", "--models", "gpt_tiny",
                                 "--out", str(tmp_path / "seq"), *sizes], capture_output=True, text=True, timeout=900)
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    results = [json.loads((tmp_path / run / "gpt_tiny" / "results.json").read_text()) for run in ("par", "seq")]
    rows = [name for name, value in results[0].items() if isinstance(value, dict) and "metrics" in value]
    assert {"teacher", "DD 1-step", "DD 2-step"} <= set(rows), results[0].keys()
    for name in rows:
        assert results[0][name]["metrics"]["fid"] == results[1][name]["metrics"]["fid"], name


@pytest.mark.slow
def test_dd_then_dd2_demo_fine_tunes_the_dd_student_and_times_both_phases(tmp_path: Path) -> None:
    """--method dd+dd2 at toy sizes: DD on the pairs, then DD2 from DD's EMA export with the fine-tuning recipe; both
    students evaluated on the same labels; the curve covers both phases, DD2's seconds after DD's."""
    import json
    import subprocess

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(Path(demo.__file__).resolve()), "--method", "dd+dd2", "--models",
                           "gpt_tiny", "--pairs", "64", "--steps", "4", "--batch", "16", "--dd2-steps", "4",
                           "--samples", "32", "--curve-points", "2", "--threads", "1", "--jobs", "1", "--out", str(out),
                           "--dd2-override", "method.lr_generator=2e-4"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = out / "gpt_tiny"
    results = json.loads((folder / "results.json").read_text())
    assert results["method"] == "dd+dd2"
    assert {"teacher", "DD 1-step", "DD+DD2 1-step"} <= set(results)
    assert not {"DD 2-step", "DD2 1-step"} & set(results)
    seconds = results["seconds"]
    assert seconds["train_s"] == pytest.approx(seconds["dd_train_s"] + seconds["dd2_train_s"])
    dd2_config = json.loads((folder / "train_dd2" / "config.json").read_text())
    assert dd2_config["method"]["name"] == "dd2" and dd2_config["method"]["code_draw"] == "gumbel"
    assert dd2_config["method"]["guidance"] == "residual" and dd2_config["method"]["gts_steps"] == 0
    assert dd2_config["method"]["lr_generator"] == 2e-4  # --dd2-override reaches the DD2 phase only
    assert Path(dd2_config["method"]["generator_init"]) == folder / "train" / "export" / "student_ema.pt"
    assert dd2_config["max_steps"] == 4 and dd2_config["batch_size"] == 8
    phases = [(row["phase"], row["step"]) for row in results["curve"]]
    assert phases == [("dd", 2), ("dd", 4), ("dd2", 2), ("dd2", 4)]
    dd_end = json.loads((folder / "train" / "export" / "student_ema.pt.json").read_text())["train_s"]
    assert all(row["train_s"] > dd_end for row in results["curve"][2:])
    assert results["curve"][1]["metrics"]["DD 1-step"] == results["DD 1-step"]["metrics"]
    assert results["curve"][3]["metrics"]["DD+DD2 1-step"] == results["DD+DD2 1-step"]["metrics"]
    assert (folder / "quality_curve.png").is_file() and (folder / "comparison.png").is_file()


def test_a_demo_rerun_into_its_folder_trains_a_new_student_and_reports_the_pairs_time_they_took(
        tmp_path: Path) -> None:
    """Training a second time into the same folder starts over (resume=auto would find the finished run and train
    nothing); complete pairs from an earlier run are reused and reported with the seconds that run recorded."""
    import json

    from dd.generate_pairs import run as run_pairs

    out = tmp_path / "gpt_test"
    assert demo._earlier_pairs_seconds(out) is None
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_test", "num_pairs=64", "shard_size=32",
                                             f"output_dir={out / 'pairs'}"]))
    assert demo._earlier_pairs_seconds(out) == 0.0  # complete, no earlier report
    (out / "results.json").write_text(json.dumps({"seconds": {"pairs_s": 12.5}}))
    assert demo._earlier_pairs_seconds(out) == 12.5
    overrides = ["optim.warmup_steps=1", "limit_val_batches=1", "logger=none"]
    first = demo._train("gpt_test", "dd", out / "train", 3, 16, 0, overrides)
    again = demo._train("gpt_test", "dd", out / "train", 3, 16, 0, overrides)
    assert first == again and json.loads(Path(str(again) + ".json").read_text())["global_step"] == 3
    assert (out / "train" / "checkpoints.previous" / "last.ckpt").is_file()  # the second run trained anew


def test_study_script_defaults_fit_both_families() -> None:
    """scripts/distill_study.py: the raw-weights row reads each family's own export key, and the teacher-involved
    row's default start is the demo's (a third of t_list[1]), valid for both families (8 was not for var_tiny)."""
    import distill_study

    assert distill_study._raw_key("gpt_tiny") == "model" and distill_study._raw_key("var_tiny") == "trainer.var_wo_ddp"
    assert demo._teacher_start("gpt_tiny", None) == 16 and demo._teacher_start("var_tiny", None) == 1
