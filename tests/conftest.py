"""Shared test fixtures. Tests never touch the network and write only under tmp paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Subprocesses (CLI and DDP tests) inherit this: two OpenMP threads per process on two shared cores thrash badly.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]


def _official_dir() -> Path:
    env = os.environ.get("DD_OFFICIAL_FIXTURES")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "fixtures" / "official"


OFFICIAL_DIR = _official_dir()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    # one thread: the suite is many small ops, and parallel test subprocesses would oversubscribe 2 cores
    torch.set_num_threads(1)


def load_official(name: str) -> dict:
    path = OFFICIAL_DIR / name
    if not path.is_file():
        pytest.fail(f"official fixture {path} missing: set DD_OFFICIAL_FIXTURES to the fixtures/official folder")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return OFFICIAL_DIR
