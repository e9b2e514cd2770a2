"""Evaluation: config composition of every sampler/schedule, validation before model loading, CPU smoke runs of
the three samplers on gpt_test and var_test (timesteps in scales), #Step counts, batch-size independence, the
offline failure of a VAR preset, a Hydra multirun and the sweep summary."""

from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import dd.eval as dd_eval
from dd.evaluation.outputs import read_samples_npz
from dd.evaluation.samplers import FewStepSampler, TeacherInvolvedSampler, TeacherSampler
from dd.runs import ConfigError

from conftest import REPO_ROOT, export_teacher_initialised_student, refuse_model_loading

CONFIGS = REPO_ROOT / "configs"
SAMPLERS = sorted(p.stem for p in (CONFIGS / "sampler").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (CONFIGS / "schedule").glob("*.yaml"))
METRICS_KEYS = {"task", "model", "sampler", "steps", "num_samples", "batch_size", "seed_base", "seed_range", "labels",
                "checksums", "reference", "metrics", "fid_is_proxy", "fid_proxy_reason", "timing", "metrics_settings"}
NO_METRICS = ["metrics.enabled=false"]
PRESETS = ("gpt_test", "var_test")
#: tests of plumbing that does not depend on the family (metrics, multirun, ranks) run on gpt_test only
GPT_ONLY = pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """The gpt_test models are tiny: with 2 intra-op threads on 2 shared, busy cores every matmul waits for a spinning
    OpenMP peer (measured 100x slower under load), so these tests run single-threaded (subprocesses too)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def compose_cfg(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module", params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def student_ckpt(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher-initialised student of the preset in its family's exported layout: {'ema': ..., 'model': ...}
    (gpt_*) or {'trainer': {'ema_parameters': ..., 'var_wo_ddp': ...}} (var_test)."""
    path = export_teacher_initialised_student(preset, tmp_path_factory.mktemp(f"student_{preset}") / "student_ema.pt")
    expected = {"ema", "model"} if preset.startswith("gpt") else {"trainer"}
    assert set(torch.load(path, weights_only=True)) == expected
    return path


def _overrides(out: Path, ckpt: Path, *extra: str, num_samples: int = 6, batch_size: int = 4,
               model: str = "gpt_test") -> list[str]:
    return [f"model={model}", f"student.checkpoint={ckpt}", f"output_dir={out}", f"num_samples={num_samples}",
            f"batch_size={batch_size}", *extra]


# -- composition ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gpt_test", "gpt_tiny", "gpt_b", "gpt_l", "var_test", "var_d16", "var_d20"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_composes_instantiates_and_validates(sampler: str, model: str) -> None:
    cfg = compose_cfg([f"sampler={sampler}", f"model={model}", "teacher_start_t=1", "output_dir=/tmp/unused"])
    built = instantiate(cfg["sampler"], _convert_="all")
    assert built.kind == sampler and cfg["run_name"].startswith(f"{model}_{sampler}")
    spec = instantiate(cfg["model"], _convert_="all")
    num_timesteps, length, _ = dd_eval.sequence_layout(spec)
    built.validate(num_timesteps, length)
    if sampler != "teacher":
        assert list(built.t_list) == list(spec.default_t_list) and built.split_t == spec.default_split_t
    if sampler != "fewstep":
        assert built.sampling == spec.sampling


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_composes_for_the_256_token_presets(schedule: str) -> None:
    cfg = compose_cfg([f"schedule={schedule}", "model=gpt_l", "output_dir=/tmp/unused"])
    sampler = instantiate(cfg["sampler"], _convert_="all")
    sampler.validate(256, 256)
    assert cfg["sampler"]["t_list"] == cfg["schedule"]["t_list"]


def test_run_names_tell_settings_apart() -> None:
    names = {compose_cfg(o + ["output_dir=/tmp/unused"])["run_name"] for o in (
        ["sampler=fewstep"], ["sampler=fewstep", "schedule=onestep"], ["sampler=teacher"],
        ["sampler=teacher_involved", "teacher_start_t=4"], ["sampler=teacher_involved", "teacher_start_t=8"])}
    assert len(names) == 5
    assert compose_cfg(["output_dir=/tmp/unused"])["student"]["checkpoint"] == \
        "outputs/train/gpt_tiny/export/student_ema.pt"


def test_sampler_step_counts() -> None:
    assert FewStepSampler((0,), 8).steps(16) == 1
    assert FewStepSampler((0, 8), 8).steps(16) == 2
    assert TeacherInvolvedSampler((0, 80), 180, 60).steps(256) == 22  # Table 2: pre-trained-61-81
    assert TeacherInvolvedSampler((0, 80), 180, 40).steps(256) == 42
    assert TeacherInvolvedSampler((0, 80), 220, 0).steps(256) == 81
    assert TeacherSampler().steps(256) == 256


def test_evaluation_core_imports_no_lightning_or_hydra() -> None:
    for path in (REPO_ROOT / "dd" / "evaluation").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("lightning", "hydra", "omegaconf")], path


# -- validation before any model is loaded -------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_model_loading(monkeypatch, "a model was loaded before validation finished")


@pytest.mark.parametrize("overrides, message", [
    (["sampler=teacher_involved", "teacher_start_t=48"], "valid range 0..47"),  # gpt_tiny: t_list [0, 48]
    (["sampler=teacher_involved", "teacher_start_t=-1"], "valid range 0..47"),
    (["sampler=teacher_involved", "teacher_start_t=40", "schedule.t_list=[0,24]"], "valid range 0..23"),
    (["sampler=teacher_involved", "schedule=onestep"], "exactly two timesteps"),
    (["schedule.t_list=[0,30,20]"], "strictly increasing"),
    (["schedule.t_list=[4,30]"], "must start with 0"),
    (["schedule.t_list=[0,64]"], "valid: 0..63"),
    (["schedule.split_t=65"], "valid range 0..64"),
    (["num_samples=0"], "num_samples=0"),
    (["labels=[3,12]"], "0..9"),
    (["labels=[a]"], "0..9"),  # not a class id (was a bare ValueError)
    (["labels=5"], "0..9"),  # one number, not a list (was a TypeError)
    (["teacher_dtype=int8"], "teacher_dtype"),
    (["metrics.reference=/nonexistent/statistic.pth"], "not found"),
    (["sampler=teacher", "model.sampling.top_p=0"], "top_p=0 must be in"),
    (["metrics.extractor=resnet"], "metrics.extractor='resnet'"),
])
def test_impossible_settings_fail_before_any_model_is_loaded(overrides: list[str], message: str,
                                                             no_model_loading: None, tmp_path: Path) -> None:
    cfg = compose_cfg([*overrides, f"output_dir={tmp_path / 'out'}", "student.checkpoint=random:0"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        dd_eval.run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["sampler=teacher_involved", "teacher_start_t=7"], "valid range 0..4", id="start7"),  # t_list [0, 5]
    pytest.param(["sampler=teacher_involved", "teacher_start_t=5"], "valid range 0..4", id="start5"),
    pytest.param(["sampler=teacher_involved", "teacher_start_t=-1"], "valid range 0..4", id="start-1"),
    pytest.param(["sampler=teacher_involved", "schedule=onestep"], "exactly two timesteps", id="onestep"),
    pytest.param(["schedule.t_list=[0,7,5]"], "strictly increasing", id="decreasing"),
    pytest.param(["schedule.t_list=[2,5]"], "must start with 0", id="start_not_0"),
    pytest.param(["schedule.t_list=[0,10]"], "valid: 0..9", id="t10"),  # 10 scales
    pytest.param(["schedule.split_t=11"], "valid range 0..10", id="split11"),
])
def test_impossible_var_settings_fail_before_any_model_is_loaded(overrides: list[str], message: str,
                                                                 no_model_loading: None, tmp_path: Path) -> None:
    """VAR-d16 timesteps are scales (0..10), and the message says so."""
    cfg = compose_cfg(["model=var_d16", *overrides, f"output_dir={tmp_path / 'out'}", "student.checkpoint=random:0"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")) as err:
        dd_eval.run(cfg)
    assert "10 timesteps counted in scales" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_impossible_var_test_settings_give_the_range_in_scales(no_model_loading: None, tmp_path: Path) -> None:
    cfg = compose_cfg(["model=var_test", "sampler=teacher_involved", "teacher_start_t=2", f"output_dir={tmp_path}",
                       "student.checkpoint=random:0"])
    with pytest.raises(ConfigError, match=r"valid range 0\.\.1") as err:
        dd_eval.run(cfg)
    assert "4 timesteps counted in scales, 30 tokens" in str(err.value)


def test_missing_student_checkpoint_names_the_path_and_the_command(no_model_loading: None, tmp_path: Path) -> None:
    cfg = compose_cfg(["sampler=fewstep", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        dd_eval.run(cfg)
    text = str(err.value)
    assert "outputs/train/gpt_tiny/export/student_ema.pt" in text and "python -m dd.train model=gpt_tiny" in text


def test_missing_var_student_checkpoint_names_the_file(no_model_loading: None, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "student_ema.pt"
    cfg = compose_cfg(["model=var_d16", "sampler=fewstep", f"student.checkpoint={missing}",
                       f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as err:
        dd_eval.run(cfg)
    text = str(err.value)
    assert str(missing) in text and "python -m dd.train model=var_d16" in text
    assert not (tmp_path / "out").exists()


def test_teacher_sampler_needs_no_student_checkpoint(no_model_loading: None, tmp_path: Path) -> None:
    spec, sampler, plan = dd_eval.validate(compose_cfg(["sampler=teacher", f"output_dir={tmp_path}"]))
    assert sampler.kind == "teacher" and plan.label_accuracy and plan.extractor == "dd-fmnist-classifier"


# -- CPU smoke runs on gpt_test and var_test -----------------------------------------------------------------------
def _check_outputs(out: Path, payload: dict, num_samples: int) -> None:
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(payload, default=str))
    assert METRICS_KEYS <= set(payload)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(num_samples)]
    images, labels = read_samples_npz(out / "samples.npz")
    size = images.shape[1]  # gpt_test: 4x4 tokens, 4x upsampling decoder -> 16 px; var_test: 8 px
    assert images.dtype == np.uint8 and images.shape == (num_samples, size, size, 3) and labels.shape == (num_samples,)
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000001.png")), images[1])
    assert Image.open(out / "grid.png").size[1] == size * len(set(labels.tolist()))  # one row per class present
    assert not (out / "parts").exists() and not (out / "samples_tmp.npy").exists()
    assert payload["seed_range"] == [dd_eval.EVAL_SEED_BASE, dd_eval.EVAL_SEED_BASE + num_samples - 1] and payload["fid_is_proxy"]
    timing = payload["timing"]
    assert timing["sampling_s_per_image"] > 0 and timing["decode_s_per_image"] > 0
    assert payload["checksums"]["tokenizer"]["state_dict_sha256"]


@pytest.mark.parametrize("preset, extra, steps", [
    pytest.param("gpt_test", ["sampler=fewstep", "schedule=onestep"], 1, id="gpt_test-fewstep-onestep"),
    pytest.param("gpt_test", ["sampler=fewstep"], 2, id="gpt_test-fewstep"),  # gpt_test t_list [0, 8]
    pytest.param("gpt_test", ["sampler=teacher_involved", "teacher_start_t=3"], 1 + (8 - 3) + 1,
                 id="gpt_test-teacher_involved-s3"),
    pytest.param("gpt_test", ["sampler=teacher_involved", "teacher_start_t=0"], 8 + 1,
                 id="gpt_test-teacher_involved-s0"),
    pytest.param("gpt_test", ["sampler=teacher"], 16, id="gpt_test-teacher"),
    # var_test: 4 scales, t_list [0, 2]; the teacher takes one step per scale
    pytest.param("var_test", ["sampler=fewstep", "schedule=onestep"], 1, id="var_test-fewstep-onestep"),
    pytest.param("var_test", ["sampler=fewstep"], 2, id="var_test-fewstep"),
    pytest.param("var_test", ["sampler=teacher_involved", "teacher_start_t=1"], 1 + (2 - 1) + 1,
                 id="var_test-teacher_involved-s1"),
    pytest.param("var_test", ["sampler=teacher_involved", "teacher_start_t=0"], 2 + 1,
                 id="var_test-teacher_involved-s0"),
    pytest.param("var_test", ["sampler=teacher"], 4, id="var_test-teacher"),
], indirect=["preset"])
def test_smoke_run_of_each_sampler(preset: str, extra: list[str], steps: int, student_ckpt: Path,
                                   tmp_path: Path) -> None:
    payload = dd_eval.run(compose_cfg(_overrides(tmp_path, student_ckpt, *extra, *NO_METRICS, model=preset)))
    _check_outputs(tmp_path, payload, 6)
    assert payload["steps"] == steps
    assert payload["model"]["preset"] == preset
    assert ("student" in payload["checksums"]) == (payload["sampler"]["kind"] != "teacher")
    assert ("teacher" in payload["checksums"]) == (payload["sampler"]["kind"] != "fewstep")
    if payload["sampler"]["kind"] != "teacher":
        assert len(payload["checksums"]["student"]["file_sha256"]) == 64


@pytest.mark.parametrize("preset", ["gpt_tiny"], indirect=True)
def test_the_typed_teacher_involved_command_runs_on_the_default_preset(preset: str, student_ckpt: Path,
                                                                        tmp_path: Path) -> None:
    """`python -m dd.eval sampler=teacher_involved teacher_start_t=40` as typed (no model=): the default gpt_tiny
    schedule [0, 48] makes s=40 the paper's "pre-trained-41-49": a student step, 8 teacher steps, a student step."""
    cfg = compose_cfg(["sampler=teacher_involved", "teacher_start_t=40", f"student.checkpoint={student_ckpt}",
                       f"output_dir={tmp_path}", "num_samples=3", "batch_size=3", *NO_METRICS])
    assert cfg["model"]["name"] == "gpt_tiny" and cfg["schedule"]["t_list"] == [0, 48]
    payload = dd_eval.run(cfg)
    assert payload["steps"] == 1 + (48 - 40) + 1 and payload["model"]["preset"] == "gpt_tiny"
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (3, 32, 32, 3)


@GPT_ONLY
def test_metrics_are_computed_and_recorded(student_ckpt: Path, tmp_path: Path) -> None:
    payload = dd_eval.run(compose_cfg(_overrides(tmp_path, student_ckpt, "metrics.label_accuracy=true",
                                                 "metrics.prc_max_real=300", num_samples=12, batch_size=12)))
    metrics = payload["metrics"]
    assert metrics["fid"] is not None and metrics["fid"] > 0, metrics["errors"]
    assert metrics["isc_mean"] is not None and 0 <= metrics["label_accuracy"] <= 1
    assert metrics["precision"] is not None and metrics["recall"] is not None
    assert payload["reference"]["sha256"] and payload["reference"]["path"].endswith("fmnist_test_stats.pt")
    assert "12 < 50000 samples" in payload["fid_proxy_reason"]


@pytest.mark.parametrize("preset, start", [("gpt_test", 3), ("var_test", 1)], indirect=["preset"],
                         ids=["gpt_test", "var_test"])
def test_samples_do_not_depend_on_batch_size(preset: str, start: int, student_ckpt: Path, tmp_path: Path) -> None:
    arrays = []
    for batch_size in (2, 3):
        out = tmp_path / f"bs{batch_size}"
        dd_eval.run(compose_cfg(_overrides(out, student_ckpt, "sampler=teacher_involved", f"teacher_start_t={start}",
                                           "write_images=false", *NO_METRICS, num_samples=5, batch_size=batch_size,
                                           model=preset)))
        arrays.append(read_samples_npz(out / "samples.npz"))
    _assert_same_samples(arrays[0], arrays[1])
    assert len({a.tobytes() for a in arrays[0][0]}) == 5  # samples differ from each other


def _assert_same_samples(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    """Same labels and the same images up to float rounding of batched kernels: BLAS/conv kernels chosen per batch
    shape (and buffer alignment) may move a rare pixel by one uint8 level; any different token or noise would
    change whole patches."""
    assert np.array_equal(a[1], b[1])
    difference = np.abs(a[0].astype(np.int16) - b[0].astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())


# -- a VAR preset offline ----------------------------------------------------------------------------------------
#: VAR-d16's transformer in float32 (310M parameters): a run that built it would hold at least this much more memory
VAR_D16_BYTES = 310e6 * 4
# Runs a command and reports its peak resident memory (kB, Linux) on the last stderr line.
_PEAK_RSS = ("import resource, subprocess, sys\n"
             "code = subprocess.run(sys.argv[1:]).returncode\n"
             "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
             "sys.exit(code)\n")


def _eval_cli(*overrides: str, cwd: Path) -> tuple[int, str, float, int]:
    """``python -m dd.eval <overrides>`` offline: (exit status, stdout + stderr, seconds, peak RSS bytes)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "dd.eval", *overrides], cwd=cwd,
                          env=dict(_env(), HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    *lines, peak = proc.stderr.rstrip("\n").splitlines()
    assert peak.startswith("peak_rss_kb "), proc.stderr
    return proc.returncode, proc.stdout + "\n".join(lines), seconds, int(peak.split()[1]) * 1024


def test_var_d16_offline_names_the_missing_tokenizer_file_and_the_setting(tmp_path: Path) -> None:
    """With a student file at hand but no VQVAE weights offline, dd.eval fails within seconds in one line that names
    the file and the setting that takes a local path, without building the models first."""
    dummy = tmp_path / "student_ema.pt"
    dummy.write_bytes(b"not read: the tokenizer is missing first")
    # the same command with a missing student file fails in validation, before anything is built: the baseline
    code, baseline_output, _, baseline_rss = _eval_cli("model=var_d16", "sampler=fewstep",
                                                       f"student.checkpoint={tmp_path / 'missing.pt'}", cwd=tmp_path)
    assert code != 0 and str(tmp_path / "missing.pt") in baseline_output, baseline_output
    code, output, seconds, rss = _eval_cli("model=var_d16", "sampler=fewstep", f"student.checkpoint={dummy}",
                                           cwd=tmp_path)
    assert code != 0, output
    assert "Traceback" not in output, output
    assert "vae_ch160v4096z32.pth" in output and "model.tokenizer.checkpoint=" in output, output
    assert seconds < 20, f"took {seconds:.0f} s"
    extra = rss - baseline_rss
    assert extra < VAR_D16_BYTES / 2, f"{extra / 2**20:.0f} MiB more than a run that failed in validation"


# -- multirun + sweep summary ----------------------------------------------------------------------------------
@GPT_ONLY
def test_multirun_sweep_and_summary(student_ckpt: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "dd.eval", "-m", "model=gpt_test", "sampler=teacher_involved",
               "teacher_start_t=0,4", f"student.checkpoint={student_ckpt}", "num_samples=4", "batch_size=4",
               "metrics.prc_reference=null", "metrics.label_accuracy=true", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {json.loads((sweep / str(i) / "metrics.json").read_text())["steps"] for i in (0, 1)}
    assert steps == {9, 1 + (8 - 4) + 1}
    summary = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "summarize_sweep.py"), str(sweep)],
                             env=_env(), capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [int(r["steps"]) for r in rows] == [6, 9] and all(r["fid"] for r in rows)
    assert (sweep / "summary.md").read_text().count("\n") == 4
    assert Image.open(sweep / "summary.png").size == (960, 400)


@pytest.mark.slow
@GPT_ONLY
def test_two_cpu_ranks_write_the_same_samples_as_one(student_ckpt: Path, tmp_path: Path) -> None:
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        command = [sys.executable, "-m", "dd.eval", *_overrides(out, student_ckpt, "sampler=teacher_involved",
                   "teacher_start_t=3", f"trainer.devices={devices}", *NO_METRICS, num_samples=7, batch_size=2)]
        result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = read_samples_npz(out / "samples.npz")
        assert json.loads((out / "metrics.json").read_text())["timing"]["num_ranks"] == devices
    _assert_same_samples(outputs[1], outputs[2])


def test_speed_benchmark_script_runs_on_the_test_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_speed", REPO_ROOT / "scripts" / "bench_speed.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_speed", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.md"
    monkeypatch.setattr(sys, "argv", ["bench_speed.py", "--device", "cpu", "--sizes", "gpt_test", "--batches", "1,2",
                                      "--repeats", "1", "--warmup", "0", "--teacher-start", "3", "--threads", "1",
                                      "--out", str(out)])
    bench.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| gpt_test")]
    assert len(rows) == 8 and [r.split(" | ")[3] for r in rows[:4]] == ["16", "1", "2", "7"]
    assert rows[0].endswith("| 1.0x | 1.0x |")


def test_an_hf_student_evaluation_records_the_downloaded_files_checksum(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """dd.push matches an evaluation to an export by the student file's sha256: an hf:// student's is the file the
    Hub cache holds (it was None before, so such an evaluation could never be pushed)."""
    import hashlib

    import dd.checkpoint
    from dd.eval import student_file_sha256

    cached = tmp_path / "student_ema.pt"
    cached.write_bytes(b"weights")
    seen = []
    monkeypatch.setattr(dd.checkpoint, "resolve_reference", lambda ref, key=None: seen.append((ref, key)) or cached)
    assert student_file_sha256("hf://org/repo/student_ema.pt") == hashlib.sha256(b"weights").hexdigest()
    assert seen == [("hf://org/repo/student_ema.pt", "student.checkpoint")]
    assert student_file_sha256(str(cached)) == hashlib.sha256(b"weights").hexdigest()
    assert student_file_sha256("random:3") is None


def test_steady_timing_leaves_out_the_first_batch_of_every_session_and_rank() -> None:
    """A resumed evaluation samples in two sessions; each session's first batch per rank (CUDA init, compilation)
    is warm-up, not steady-state latency, wherever it lands among the merged records."""
    from dd.evaluation.report import timing_summary

    def record(session: str | None, rank: int, seconds: float) -> dict:
        return {"count": 4, "sampling_s": seconds, "decode_s": seconds / 10, "rank": rank, "session": session}

    batches = [record("a", 0, 40.0), record("a", 0, 4.0), record("a", 1, 40.0), record("a", 1, 4.0),
               record("b", 0, 40.0), record("b", 0, 4.0), record("b", 1, 40.0), record("b", 1, 4.0)]
    summary = timing_summary(batches)
    assert summary["sampling_s_per_image_steady"] == 1.0 and summary["num_ranks"] == 2
    assert summary["sampling_s_per_image"] == (4 * 40.0 + 4 * 4.0) / 32
    old = timing_summary([{k: v for k, v in r.items() if k != "session"} for r in batches[:2]])  # older parts
    assert old["sampling_s_per_image_steady"] == 1.0


def test_default_evaluation_seeds_are_not_the_training_noise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """dd.eval's default seed_base lies past every seed dd trains on (pairs from 0, DD2 from 1e9); an evaluation
    whose seeds fall inside the student's recorded training seeds is warned about, naming them."""
    from dd.eval import EVAL_SEED_BASE, training_seed_overlap

    cfg = compose_cfg([f"output_dir={tmp_path / 'out'}"])
    assert cfg["seed_base"] == EVAL_SEED_BASE > 2_000_000_000 + 10**8
    student = tmp_path / "student_ema.pt"
    student.write_bytes(b"")
    (tmp_path / "student_ema.pt.json").write_text(json.dumps({"training_seed_range": [0, 2047]}))
    assert training_seed_overlap(str(student), 0, 5000) == (0, 2047)
    assert training_seed_overlap(str(student), 2000, 100) == (2000, 2047)
    assert training_seed_overlap(str(student), 2048, 100) is None
    assert training_seed_overlap(str(student), EVAL_SEED_BASE, 50_000) is None
    assert training_seed_overlap(str(tmp_path / "no_sidecar.pt"), 0, 10) is None
    with caplog.at_level("WARNING", logger="dd.eval"):
        dd_eval._warn_on_training_seeds(str(student), 0, 10)
    assert any("seeds 0..9 of this evaluation are the student's training noise" in r.getMessage()
               for r in caplog.records)
