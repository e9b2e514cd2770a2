"""Resuming evaluation runs (dd.evaluation.resume, dd.eval resume=auto|never): an interrupted run finished by a re-run
writes the same bytes as an uninterrupted one (in-process interruption on both families, kill -9 of the CLI), a
finished run is re-scored without sampling or grown to a larger num_samples by sampling the new indices alone, a
smaller num_samples and other settings or weights are refused before anything is overwritten."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dd.eval as dd_eval
import dd.tasks.eval_sampling as eval_sampling
from dd.evaluation import outputs
from dd.evaluation.resume import differences, done_mask, missing_ranges
from dd.runs import ConfigError

from conftest import REPO_ROOT, export_teacher_initialised_student, refuse_model_loading

CONFIGS = REPO_ROOT / "configs"
NO_METRICS = "metrics.enabled=false"
#: plumbing that does not depend on the family runs on gpt_test only
GPT_ONLY = pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)


def _cfg(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("eval", overrides=overrides), resolve=True)


def _overrides(out: Path, ckpt: Path | str, *extra: str, model: str = "gpt_test", num_samples: int = 10,
               batch_size: int = 3) -> list[str]:
    return [f"model={model}", f"student.checkpoint={ckpt}", f"output_dir={out}", f"num_samples={num_samples}",
            f"batch_size={batch_size}", "sampler=teacher_involved", "teacher_start_t=1", *extra]


@pytest.fixture(scope="module", params=["gpt_test", "var_test"])
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def student_ckpt(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher-initialised student exported in the preset family's layout."""
    torch.set_num_threads(1)
    return export_teacher_initialised_student(preset, tmp_path_factory.mktemp(f"student_{preset}") / "student_ema.pt")


@pytest.fixture
def sampled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(first, count) of every batch the evaluation task samples."""
    calls: list[tuple[int, int]] = []
    original = eval_sampling.sample_eval_batch

    def counting(models, sampler, first, count, *args, **kwargs):
        calls.append((first, count))
        return original(models, sampler, first, count, *args, **kwargs)

    monkeypatch.setattr(eval_sampling, "sample_eval_batch", counting)
    return calls


class _Killed(RuntimeError):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """The writer dies (as a killed process would) right after writing ``batches`` batches."""
    original = eval_sampling.write_batch
    written = []

    def dying(*args, **kwargs):
        if len(written) == batches:
            raise _Killed("simulated kill")
        written.append(original(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(eval_sampling, "write_batch", dying)


def _files(out: Path) -> dict[str, bytes]:
    """Every sample output's bytes: samples.npz, grid.png and the PNGs."""
    names = [outputs.SAMPLES_FILE, outputs.GRID_FILE, *(f"images/{p.name}" for p in (out / "images").glob("*.png"))]
    return {name: (out / name).read_bytes() for name in sorted(names)}


def _comparable(payload: dict) -> dict:
    """metrics.json without what differs between any two runs (time stamps, timings, session counts)."""
    return {k: v for k, v in payload.items() if k not in ("created_at", "timing", "resume")}


# -- pure functions ------------------------------------------------------------------------------------------------
def test_missing_ranges_follow_the_batch_grid() -> None:
    done = np.zeros(10, dtype=bool)
    assert missing_ranges(done, 3) == [(0, 3), (3, 3), (6, 3), (9, 1)]
    done[3:6] = True  # the second batch finished
    assert missing_ranges(done, 3) == [(0, 3), (6, 3), (9, 1)]
    done[:] = False
    done[:3] = True  # finished with batch 3, resumed with batch 4: cut at 4 and 8
    assert missing_ranges(done, 4) == [(3, 1), (4, 4), (8, 2)]
    done[5] = True
    assert missing_ranges(done, 4) == [(3, 1), (4, 1), (6, 2), (8, 2)]
    assert missing_ranges(np.ones(4, dtype=bool), 2) == []


def test_differences_name_the_changed_leaves() -> None:
    before = {"model": {"sampling": {"cfg_scale": 2.0}}, "seed_base": 0, "t_list": (0, 8)}
    now = {"model": {"sampling": {"cfg_scale": 3.0}}, "seed_base": 0, "t_list": [0, 8]}
    assert differences(before, now) == ["model.sampling.cfg_scale: before 2.0, now 3.0"]


def test_samples_npz_is_byte_reproducible_and_opens_as_a_memory_map(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(5)
    first = outputs.write_samples_npz(tmp_path / "a.npz", images, labels).read_bytes()
    later = time.time() + 3600  # a zip entry stamped with the current time would change the bytes
    monkeypatch.setattr(time, "time", lambda: later)
    assert outputs.write_samples_npz(tmp_path / "b.npz", images, labels).read_bytes() == first
    mapped, read_labels = outputs.open_samples_npz(tmp_path / "a.npz")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images) and np.array_equal(read_labels, labels)
    np.savez_compressed(tmp_path / "d.npz", arr_0=images, labels=labels)  # someone else's compressed file: read
    assert np.array_equal(outputs.open_samples_npz(tmp_path / "d.npz")[0], images)


# -- runs ----------------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_files(preset: str, student_ckpt: Path, tmp_path: Path,
                                                   sampled: list[tuple[int, int]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference = dd_eval.run(_cfg(_overrides(tmp_path / "whole", student_ckpt, NO_METRICS, model=preset)))
    assert sampled == [(0, 3), (3, 3), (6, 3), (9, 1)]
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(_Killed):
            dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, model=preset)))
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part_0000000_000003.pt", "part_0000003_000003.pt"]
    assert done_mask(out, 10).tolist() == [True] * 6 + [False] * 4
    sampled.clear()
    payload = dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, model=preset)))
    assert sampled == [(6, 3), (9, 1)], "a resumed run samples only the missing batches"
    assert _files(out) == _files(tmp_path / "whole")
    assert _comparable(payload) == _comparable(reference)
    assert payload["resume"] == {"sessions": 2, "sampled_this_session": 4}
    assert payload["timing"]["num_batches"] == 4  # timings of the kept batches too
    assert not (out / "parts").exists() and not (out / "samples_tmp.npy").exists()


@GPT_ONLY
def test_finished_run_is_rescored_without_sampling(preset: str, student_ckpt: Path, tmp_path: Path,
                                                   sampled: list[tuple[int, int]]) -> None:
    """Metric, image and batch-size settings do not shape the samples: a re-run with other ones keeps them all,
    writes the PNGs a run without images left out and computes the metrics the first run skipped."""
    first = dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, NO_METRICS, "write_images=false")))
    before = (tmp_path / outputs.SAMPLES_FILE).read_bytes()
    assert first["metrics"] == {} or first["metrics"].get("fid") is None
    assert not (tmp_path / "images").exists()
    sampled.clear()
    payload = dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, "metrics.prc_reference=null",
                                          "metrics.label_accuracy=true", batch_size=5)))
    assert sampled == []
    assert (tmp_path / outputs.SAMPLES_FILE).read_bytes() == before
    assert payload["metrics"]["fid"] is not None and payload["metrics"]["label_accuracy"] is not None
    assert payload["resume"] == {"sessions": 2, "sampled_this_session": 0}
    assert payload["timing"] == {**first["timing"], "total_wall_s": payload["timing"]["total_wall_s"]}
    images, _ = outputs.read_samples_npz(tmp_path / outputs.SAMPLES_FILE)
    from PIL import Image
    assert len(list((tmp_path / "images").glob("*.png"))) == 10
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "000007.png")), images[7])


@GPT_ONLY
def test_resume_with_another_batch_size_covers_every_sample(preset: str, student_ckpt: Path, tmp_path: Path,
                                                            sampled: list[tuple[int, int]],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    dd_eval.run(_cfg(_overrides(tmp_path / "whole", student_ckpt, NO_METRICS)))
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Killed):
            dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS)))
    (out / "images" / "000009.png").write_bytes(b"\x89PNG half-written by a killed batch")
    sampled.clear()
    dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, "write_images=false", batch_size=4)))
    assert sampled == [(3, 1), (4, 4), (8, 2)]
    # the first session's finished PNGs stay; nothing is left of the batches sampled again without images
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    (images, labels), (ref_images, ref_labels) = (outputs.read_samples_npz(d / outputs.SAMPLES_FILE)
                                                  for d in (out, tmp_path / "whole"))
    assert np.array_equal(labels, ref_labels)
    # other batch shapes may move a rare pixel by one level (float rounding of batched kernels), nothing more
    assert np.abs(images.astype(np.int16) - ref_images.astype(np.int16)).max() <= 1


@GPT_ONLY
def test_finished_run_grows_to_a_larger_num_samples(preset: str, student_ckpt: Path, tmp_path: Path,
                                                    sampled: list[tuple[int, int]]) -> None:
    """A finished run re-run with a larger num_samples keeps its samples and samples only the new indices; the
    result is that of a single run with the larger count, byte for byte (the earlier count is on the batch grid).
    A smaller num_samples is refused: a re-run never drops samples."""
    out = tmp_path / "grown"
    dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=6)))
    first_images, first_labels = outputs.read_samples_npz(out / outputs.SAMPLES_FILE)
    first_pngs = {name: data for name, data in _files(out).items() if name.startswith("images/")}
    assert len(first_pngs) == 6
    sampled.clear()
    payload = dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=12)))
    assert sampled == [(6, 3), (9, 3)], "only the new samples are sampled"
    images, labels = outputs.read_samples_npz(out / outputs.SAMPLES_FILE)
    assert len(images) == len(labels) == 12 and payload["num_samples"] == 12 and payload["seed_range"] == [dd_eval.EVAL_SEED_BASE, dd_eval.EVAL_SEED_BASE + 11]
    assert np.array_equal(images[:6], first_images) and np.array_equal(labels[:6], first_labels)
    assert all(_files(out)[name] == data for name, data in first_pngs.items())
    assert payload["resume"] == {"sessions": 2, "sampled_this_session": 6}
    assert payload["timing"]["num_batches"] == 4  # the kept batches' timings too
    reference = dd_eval.run(_cfg(_overrides(tmp_path / "whole", student_ckpt, NO_METRICS, num_samples=12)))
    assert _files(out) == _files(tmp_path / "whole")
    assert _comparable(payload) == _comparable(reference)
    kept = _files(out)
    with pytest.raises(ConfigError, match="num_samples=6 is fewer than the 12 samples"):
        dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=6)))
    assert _files(out) == kept


@GPT_ONLY
def test_interrupted_growth_resumes_to_the_same_files(preset: str, student_ckpt: Path, tmp_path: Path,
                                                      sampled: list[tuple[int, int]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "grown"
    dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=6)))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Killed):
            dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=12)))
    assert outputs.part_ranges(out) == [(6, 3)]
    with pytest.raises(ConfigError, match="num_samples=9 is fewer than the 12 samples"):
        dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=9)))
    sampled.clear()
    payload = dd_eval.run(_cfg(_overrides(out, student_ckpt, NO_METRICS, num_samples=12)))
    assert sampled == [(9, 3)]
    assert payload["resume"] == {"sessions": 3, "sampled_this_session": 3}
    reference = dd_eval.run(_cfg(_overrides(tmp_path / "whole", student_ckpt, NO_METRICS, num_samples=12)))
    assert _files(out) == _files(tmp_path / "whole")
    assert _comparable(payload) == _comparable(reference)


@GPT_ONLY
def test_other_settings_or_weights_are_refused_and_never_starts_over(preset: str, student_ckpt: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, NO_METRICS)))
    kept = {name: (tmp_path / name).read_bytes() for name in ("samples.npz", "config.json", "metrics.json")}
    with monkeypatch.context() as patch:
        refuse_model_loading(patch, "a model was loaded before the settings were checked")
        for extra, difference in ((["seed_base=1"], f"seed_base: before {dd_eval.EVAL_SEED_BASE}, now 1"),
                                  (["model.sampling.cfg_scale=3.0"], "model.sampling.cfg_scale: before 2.0, now 3.0"),
                                  (["teacher_start_t=2"], "sampler.teacher_start_t: before 1, now 2")):
            with pytest.raises(ConfigError) as err:
                dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, NO_METRICS, *extra)))
            assert difference in str(err.value) and "resume=never" in str(err.value), str(err.value)
        with pytest.raises(ConfigError, match="num_samples=8 is fewer than the 10 samples") as err:
            dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, NO_METRICS, num_samples=8)))
        assert "num_samples=10 or more" in str(err.value) and "resume=never" in str(err.value)
    # the same settings with other student weights: refused once the weights are loaded
    with pytest.raises(ConfigError, match=r"other weights \(state_dict_sha256\): student: before '[0-9a-f]{8}"):
        dd_eval.run(_cfg(_overrides(tmp_path, "random:5", NO_METRICS)))
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept, "a refused run changed the folder"
    payload = dd_eval.run(_cfg(_overrides(tmp_path, "random:5", NO_METRICS, "resume=never", "seed_base=1")))
    assert payload["resume"] == {"sessions": 1, "sampled_this_session": 10} and payload["seed_range"] == [1, 10]
    with pytest.raises(ConfigError, match="resume='sometimes'"):
        dd_eval.run(_cfg(_overrides(tmp_path, student_ckpt, "resume=sometimes")))


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@GPT_ONLY
def test_killed_cli_run_resumes_to_the_same_samples(preset: str, student_ckpt: Path, tmp_path: Path) -> None:
    """kill -9 of ``python -m dd.eval`` once some batches are on disk; the same command then finishes the run with
    the same samples.npz bytes as an uninterrupted run, and a run with other settings ends in one clean line."""
    num_samples = 48
    for attempt in range(3):  # a busy machine may finish the run before the kill lands: then try a longer one
        out = tmp_path / f"cli{attempt}"
        command = [sys.executable, "-m", "dd.eval",
                   *_overrides(out, student_ckpt, NO_METRICS, num_samples=num_samples, batch_size=2)]
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and len(outputs.part_ranges(out)) < 2:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        num_samples *= 4
    else:
        pytest.fail("the run always finished before it could be killed")
    done = int(done_mask(out, num_samples).sum())
    assert 0 < done < num_samples and not (out / outputs.SAMPLES_FILE).exists()
    resumed = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / outputs.METRICS_FILE).read_text())
    assert metrics["resume"] == {"sessions": 2, "sampled_this_session": num_samples - done}
    dd_eval.run(_cfg(_overrides(tmp_path / "whole", student_ckpt, NO_METRICS, num_samples=num_samples,
                                batch_size=2)))
    assert (out / outputs.SAMPLES_FILE).read_bytes() == (tmp_path / "whole" / outputs.SAMPLES_FILE).read_bytes()
    refused = subprocess.run([*command, "seed_base=7"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and lines[0].startswith("dd.eval: "), refused.stderr
    assert f"seed_base: before {dd_eval.EVAL_SEED_BASE}, now 7" in lines[0] and "resume=never" in lines[0]
