"""Shared test fixtures. Tests never touch the network and write only under tmp paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dd.data.fashion_mnist import DEFAULT_ROOT as FMNIST_ROOT

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Subprocesses (CLI and DDP tests) inherit this: two OpenMP threads per process on two shared cores thrash badly.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]


def _official_dir() -> Path:
    """The official-layout parity fixtures: the copy inside the repository, unless DD_OFFICIAL_FIXTURES names
    another folder (tests never read outside the repository unless an environment variable says so)."""
    env = os.environ.get("DD_OFFICIAL_FIXTURES")
    if env:
        return Path(env)
    return REPO_ROOT / "tests" / "fixtures" / "official"


OFFICIAL_DIR = _official_dir()

#: tests that read the real Fashion-MNIST files (CI installs them; .ci/run)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install -y dataset-fashion-mnist",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow_for("var_test")``: the test's ``var_test`` instance is ``slow`` (run by ``-m slow``), its
    other presets stay in the default suite. Runs before ``-m`` deselects anything."""
    for item in items:
        marker = item.get_closest_marker("slow_for")
        if marker is None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "preset" not in params:  # the marker would silently do nothing
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.slow_for needs a 'preset'-parametrised test")
        if params["preset"] in marker.args:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, and an empty per-test TORCH_HOME / HF_HOME: nothing is found in or written to a real cache."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # one thread: the suite is many small ops, and parallel test subprocesses would oversubscribe 2 cores
    torch.set_num_threads(1)


def load_official(name: str) -> dict:
    path = OFFICIAL_DIR / name
    if not path.is_file():
        pytest.fail(f"official fixture {path} missing: restore tests/fixtures/official (git checkout) or set "
                    f"DD_OFFICIAL_FIXTURES to a folder holding the official fixtures")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return OFFICIAL_DIR


def export_teacher_initialised_student(preset: str, path: Path) -> Path:
    """A teacher-initialised student of ``configs/model/<preset>.yaml`` exported as dd.train exports one (the
    family's layout: {'ema', 'model'} for LlamaGen, {'trainer': {...}} for VAR; EMA = raw weights) at ``path``."""
    from dd.distill.ema import export_student
    from dd.models.presets import spec_from_yaml

    spec = spec_from_yaml(REPO_ROOT / "configs" / "model" / f"{preset}.yaml")
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    return export_student(path, student.state_dict(), student.state_dict(), {"model": preset}, keys=spec.export_keys)


def refuse_model_loading(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """Make building any model of either family fail with ``message``: proves a check ran before loading."""
    from dd.models.llamagen import LlamaGenSpec
    from dd.models.var import VARSpec

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(message)

    for spec_class in (LlamaGenSpec, VARSpec):
        for name in ("build_family", "build_tokenizer", "build_teacher", "build_student"):
            monkeypatch.setattr(spec_class, name, refuse)
