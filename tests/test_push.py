"""Sharing a student (dd.hub, python -m dd.push): the folder and model card it builds, the upload calls (HfApi
monkeypatched, no network), hf:// references loading what it uploaded (a Hugging Face cache laid out from the folder,
as a download would leave it), the card's command reproducing the evaluation, and one-line failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dd.eval as dd_eval
from dd import hub
from dd.checkpoint import file_sha256, state_dict_sha256
from dd.distill.ema import export_student
from dd.push import run as run_push
from dd.runs import ConfigError

from conftest import REPO_ROOT

REPO_ID = "dd-tests/tiny-student"
NO_PRC = ["metrics.prc_reference=null", "metrics.label_accuracy=true"]


def _cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


@pytest.fixture(scope="module", params=["gpt_test", "var_test"])
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def export(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student exported as dd.train exports it: weights in the family's layout plus the .json config."""
    torch.set_num_threads(1)
    cfg = _cfg("train", [f"model={preset}"])
    spec = instantiate(cfg["model"], _convert_="all")
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    raw = {k: v + 0.01 if v.is_floating_point() else v for k, v in student.state_dict().items()}  # EMA != raw
    path = tmp_path_factory.mktemp(f"train_{preset}") / "export" / "student_ema.pt"
    path.parent.mkdir()
    return export_student(path, student.state_dict(), raw,
                          {"model": cfg["model"], "schedule": cfg["schedule"], "global_step": 24,
                           "teacher_sha256": state_dict_sha256(family.teacher),
                           "metrics": {"val/sample_token_acc_2step": 0.25, "train/loss": 3.0}},
                          keys=spec.export_keys)


@pytest.fixture(scope="module")
def evals(preset: str, export: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two dd.eval folders: the student's 2-step samples and the teacher's own (a baseline row of the card)."""
    root = tmp_path_factory.mktemp(f"evals_{preset}")
    folders = []
    for sampler in ("fewstep", "teacher"):
        out = root / f"{preset}_{sampler}"
        dd_eval.run(_cfg("eval", [f"model={preset}", f"sampler={sampler}", f"student.checkpoint={export}",
                                  f"output_dir={out}", "num_samples=8", "batch_size=4", *NO_PRC]))
        folders.append(out)
    return folders


def _push_cfg(export: Path, evals: list[Path], folder: Path, *extra: str) -> dict:
    return _cfg("push", [f"repo_id={REPO_ID}", f"student={export}", f"evals=[{','.join(map(str, evals))}]",
                         f"folder={folder}", *extra])


def _simulated_hub_cache(folder: Path, cache: Path, repo_id: str = REPO_ID) -> Path:
    """A Hugging Face cache holding ``folder`` as the snapshot of ``repo_id``'s main branch (the layout
    hf_hub_download leaves behind), so offline hf:// references resolve to what was uploaded."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return cache


# -- the folder and the card -----------------------------------------------------------------------------------------
def test_dry_run_builds_the_folder_and_the_card(preset: str, export: Path, evals: list[Path], tmp_path: Path) -> None:
    result = run_push(_push_cfg(export, evals, tmp_path / "hub", "dry_run=true", "license=apache-2.0"))
    folder = Path(result["folder"])
    assert result["url"] is None and folder == tmp_path / "hub"
    names = [e.name for e in evals]
    assert result["files"] == sorted(["README.md", "dd_push.json", "student_ema.pt", "student_ema.pt.json",
                                      *(f"evals/{n}/{f}" for n in names for f in hub.EVAL_FILES)])
    assert (folder / "student_ema.pt").read_bytes() == export.read_bytes()
    manifest = json.loads((folder / "dd_push.json").read_text())
    assert manifest["files"]["student_ema.pt"] == file_sha256(export) and manifest["repo_id"] == REPO_ID
    card = (folder / "README.md").read_text()
    config = json.loads((folder / "student_ema.pt.json").read_text())
    assert card.startswith("---\nlicense: apache-2.0\n") and f"- {config['model']['family']}" in card
    assert config["teacher_sha256"] in card and file_sha256(export) in card
    assert f"`t_list` {config['schedule']['t_list']} and `split_t` {config['schedule']['split_t']}" in card
    assert f"teacher weights `{config['model']['teacher']['checkpoint']}`" in card
    assert "24 training steps" in card and "val/sample_token_acc_2step 0.250" in card
    for eval_dir in evals:
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        row = next(line for line in card.splitlines() if line.startswith(f"| [{eval_dir.name}]"))
        assert f"| {metrics['steps']} | 8 | {metrics['metrics']['fid']:.2f} *" in row
        assert f"{metrics['metrics']['label_accuracy']:.3f}" in row
        timing = metrics["timing"]  # steady-state seconds per image when there was more than one batch
        shown = timing["sampling_s_per_image_steady"] or timing["sampling_s_per_image"]
        assert row.endswith(f"| {shown:.4f} |"), (row, timing)
        assert f"![{eval_dir.name}](evals/{eval_dir.name}/grid.png)" in card
    student_cmd, teacher_cmd = (line for line in card.splitlines() if line.startswith("python -m dd.eval"))
    t_list = ",".join(map(str, config["schedule"]["t_list"]))
    assert student_cmd == (f"python -m dd.eval model={preset} sampler=fewstep schedule.t_list=[{t_list}] "
                           f"schedule.split_t={config['schedule']['split_t']} num_samples=8 "
                           f"seed_base={dd_eval.EVAL_SEED_BASE} "
                           f"labels=uniform student.checkpoint=hf://{REPO_ID}/student_ema.pt")
    assert teacher_cmd == (f"python -m dd.eval model={preset} sampler=teacher num_samples=8 "
                           f"seed_base={dd_eval.EVAL_SEED_BASE} labels=uniform")
    assert f'checkpoint="hf://{REPO_ID}/student_ema.pt"' in card and "proxy FID" in card


def test_hf_reference_loads_what_was_uploaded(preset: str, export: Path, evals: list[Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(run_push(_push_cfg(export, evals, tmp_path / "hub", "dry_run=true"))["folder"])
    cache = _simulated_hub_cache(folder, tmp_path / "hf_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    spec = instantiate(_cfg("eval", [f"model={preset}"])["model"], _convert_="all")
    family = spec.build_family()
    from_hub = spec.build_student(family.codebook(), init="checkpoint", checkpoint=f"hf://{REPO_ID}/student_ema.pt")
    local = spec.build_student(family.codebook(), init="checkpoint", checkpoint=str(export))
    assert state_dict_sha256(from_hub) == state_dict_sha256(local)
    with pytest.raises(Exception, match="not_there.pt"):
        spec.build_student(family.codebook(), init="checkpoint", checkpoint=f"hf://{REPO_ID}/not_there.pt")


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_the_cards_command_reproduces_the_evaluation(preset: str, export: Path, evals: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's dd.eval command, run against the uploaded student, writes the same samples.npz bytes."""
    folder = Path(run_push(_push_cfg(export, evals[:1], tmp_path / "hub", "dry_run=true"))["folder"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_simulated_hub_cache(folder, tmp_path / "c")))
    command = next(line for line in (folder / "README.md").read_text().splitlines()
                   if line.startswith("python -m dd.eval"))
    overrides = command.split()[3:]
    dd_eval.run(_cfg("eval", [*overrides, f"output_dir={tmp_path / 'again'}", "metrics.enabled=false"]))
    assert (tmp_path / "again" / "samples.npz").read_bytes() == (evals[0] / "samples.npz").read_bytes()


# -- the upload -----------------------------------------------------------------------------------------------------
@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off (the suite runs with HF_HUB_OFFLINE=1), a token in HF_TOKEN; HfApi must still be patched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """Every HfApi call that would reach the network, recorded with the api's token instead of being sent."""
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name: str):
        def record(self, *args, **kwargs):
            calls.append((name, args, {**kwargs, "api_token": self.token}))
            return f"https://huggingface.co/{REPO_ID}/commit/abc" if name == "upload_folder" else None
        return record

    for name in ("create_repo", "create_branch", "upload_folder", "upload_file", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, recorder(name))
    return calls


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_upload_creates_the_repo_and_uploads_the_folder(preset: str, export: Path, evals: list[Path], tmp_path: Path,
                                                        online: None, hub_calls: list) -> None:
    result = run_push(_push_cfg(export, evals, tmp_path / "hub", "private=true"))
    folder = tmp_path / "hub"
    assert result["url"] == f"https://huggingface.co/{REPO_ID}/commit/abc" and (folder / "README.md").is_file()
    assert [name for name, _, _ in hub_calls] == ["create_repo", "upload_folder"]
    (_, args, kwargs), (_, up_args, upload) = hub_calls
    assert args == (REPO_ID,) and kwargs == {"repo_type": "model", "private": True, "exist_ok": True,
                                             "api_token": "hf_test_token"}
    assert up_args == () and upload["repo_id"] == REPO_ID and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == folder and upload["revision"] is None
    assert upload["commit_message"] and upload["api_token"] == "hf_test_token"
    hub_calls.clear()
    run_push(_push_cfg(export, evals, folder, "revision=v1", "token=hf_explicit", "commit_message=first"))
    assert [name for name, _, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[1][2]["branch"] == "v1" and hub_calls[1][2]["exist_ok"] is True
    assert hub_calls[2][2]["revision"] == "v1" and hub_calls[2][2]["commit_message"] == "first"
    assert {call[2]["api_token"] for call in hub_calls} == {"hf_explicit"}


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_hub_failures_are_one_line_errors(preset: str, export: Path, tmp_path: Path, online: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    refused = HfHubHTTPError("401 Client Error: Unauthorized for url\nmore detail",
                             response=httpx2.Response(401, request=request))
    for error, message in ((refused, "the Hub refused the upload .*401.*hf auth login"),
                           (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
                            "could not reach the Hugging Face Hub")):
        def fail(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
        with pytest.raises(ConfigError, match=message) as err:
            run_push(_push_cfg(export, [], tmp_path / "hub"))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_push_refuses_bad_inputs(preset: str, export: Path, evals: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repo_id=None"):
        run_push(_cfg("push", [f"student={export}", "dry_run=true"]))
    with pytest.raises(ConfigError, match="no exported student at .*python -m dd.train"):
        run_push(_push_cfg(tmp_path / "missing.pt", [], tmp_path / "hub", "dry_run=true"))
    other = tmp_path / "other" / "student_ema.pt"
    other.parent.mkdir()
    other.write_bytes(export.read_bytes() + b"\0")  # another file: the evaluations did not score it
    shutil.copy(str(export) + ".json", str(other) + ".json")
    with pytest.raises(ConfigError, match=f"{evals[0]} evaluated another student file"):
        run_push(_push_cfg(other, evals, tmp_path / "hub", "dry_run=true"))
    run_push(_push_cfg(other, evals[1:], tmp_path / "hub", "dry_run=true"))  # the teacher baseline still fits
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not for upload")
    with pytest.raises(ConfigError, match="was not assembled by dd.push"):
        run_push(_push_cfg(export, evals, tmp_path / "mine", "dry_run=true"))
    assert (tmp_path / "mine" / "notes.txt").is_file()


def _push_cli(*overrides: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "dd.push", *overrides], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset", ["gpt_test"], indirect=True)
def test_cli_without_token_or_offline_says_how_to_authenticate(preset: str, export: Path, tmp_path: Path) -> None:
    for env, reason in (({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                        ({"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "no_login")}, "no Hugging Face token")):
        result = _push_cli(f"repo_id={REPO_ID}", f"student={export}", cwd=tmp_path, **env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("dd.push: ") and reason in lines[0], lines[0]
        assert "hf auth login" in lines[0] and "HF_TOKEN" in lines[0]
        assert not (tmp_path / "outputs").exists(), "a refused push assembled its folder"
    dry = _push_cli(f"repo_id={REPO_ID}", f"student={export}", "dry_run=true", cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert dry.returncode == 0, dry.stderr
    assert (tmp_path / "outputs" / "push" / REPO_ID / "README.md").is_file()
    assert {p.name for p in tmp_path.iterdir()} <= {"no_login", "outputs"}, "dd.push wrote outside its folder"


def test_hub_module_imports_neither_lightning_nor_hydra() -> None:
    code = ("import sys, dd.hub\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_offline_check_works_on_hub_versions_without_is_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub < 1.2.1 has only the HF_HUB_OFFLINE constant (pyproject allows >= 0.23): no AttributeError."""
    from dd.hub import _offline

    monkeypatch.delattr(huggingface_hub.constants, "is_offline_mode", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert _offline() is False
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _offline() is True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _offline() is True


def test_reproduce_command_names_every_model_setting_that_shapes_the_samples(tmp_path: Path) -> None:
    """Beyond model.sampling.*: any other model setting that differs from the preset (here VAR's prefix attention),
    a precision no hardware preset has, and a non-default student checkpoint key; never local weight paths."""
    import yaml

    preset = yaml.safe_load((hub._CONFIGS / "model" / "var_tiny.yaml").read_text())
    model = {**preset, "prefix_attention": "block_causal", "sampling": {**preset["sampling"], "top_k": 5},
             "teacher": {**preset["teacher"], "checkpoint": "/home/me/teacher.pt"}}
    overrides = hub._preset_overrides({"model": model, "trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}})
    assert sorted(overrides) == ["model.prefix_attention=block_causal", "model.sampling.top_k=5",
                                 "trainer.precision=bf16-mixed"]
    assert hub._preset_overrides({"model": preset, "trainer": {"accelerator": "cpu", "precision": "32-true"}}) == []
    config = {"model": preset, "trainer": {"accelerator": "cpu", "precision": "32-true"}, "num_samples": 8,
              "seed_base": 0, "labels": "uniform", "student": {"checkpoint_key": "trainer.var_wo_ddp"}}
    result = hub.EvalResult("e", tmp_path, {"sampler": {"kind": "fewstep", "t_list": [0], "split_t": 6},
                                            "checksums": {"student": {}}}, config)
    command = hub.eval_command(result, REPO_ID)
    assert "student.checkpoint_key=trainer.var_wo_ddp" in command and "/home/me" not in command
