"""The config groups are the registry: every option of every group composes and instantiates; core stays pure torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dd.models.llamagen import LlamaGenSpec
from dd.models.var import VARSpec

from conftest import REPO_ROOT
from test_pairs import compose_cfg

CONFIGS = REPO_ROOT / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _roots(group: str = "model") -> list[str]:
    """The root configs whose defaults choose from ``group`` (push.yaml, which only uploads files, has none)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if f"  - {group}:" in p.read_text())


@pytest.mark.parametrize("root", _roots())
@pytest.mark.parametrize("model", _options("model"))
def test_every_model_preset_composes_and_builds_on_meta(root: str, model: str) -> None:
    cfg = compose_cfg(root, [f"model={model}"])
    spec = instantiate(cfg["model"], _convert_="all")
    assert isinstance(spec, (LlamaGenSpec, VARSpec)) and spec.name == model
    tokenizer, teacher, student = spec.meta_models()
    vocab, dim = tokenizer.codebook().shape
    assert teacher.vocab_size == vocab == student.vocab_size
    assert student.codebook.shape == (vocab, dim)
    assert spec.default_t_list[0] == 0 and all(t < spec.num_timesteps for t in spec.default_t_list)
    assert 0 <= spec.default_split_t <= spec.num_timesteps


@pytest.mark.parametrize("model", _options("model"))
def test_flow_map_defaults_follow_the_presets_codebook_and_yield_to_overrides(model: str) -> None:
    """The real LlamaGen presets (V = 16384 x 8) take the study's cheapest passing setting at that shape (50 steps,
    power-1.5 grid); every other preset the global default (100 uniform steps); ``flow.*=`` overrides either, and
    every composed setting is a valid FlowMapConfig."""
    from dd.flow import FlowMapConfig

    flow = compose_cfg("generate_pairs", [f"model={model}"])["flow"]
    config = FlowMapConfig(**flow)
    spec = instantiate(compose_cfg("generate_pairs", [f"model={model}"])["model"], _convert_="all")
    vocab, dim = spec.meta_models()[0].codebook().shape
    if model in ("gpt_b", "gpt_l", "gpt_xl"):
        assert (vocab, dim) == (16384, 8)
        assert (config.solver, config.num_steps, config.time_grid, config.grid_power) == ("dpmpp_2m", 50, "power", 1.5)
    else:
        assert (config.solver, config.num_steps, config.time_grid) == ("dpmpp_2m", 100, "uniform")
    overridden = compose_cfg("generate_pairs", [f"model={model}", "flow.num_steps=200", "flow.time_grid=uniform"])
    assert (overridden["flow"]["num_steps"], overridden["flow"]["time_grid"]) == (200, "uniform")


@pytest.mark.parametrize("group", ["hardware", "logger", "schedule"])
def test_every_option_of_the_shared_groups_composes(group: str) -> None:
    roots = [r for r in _roots(group) if group != "schedule" or r == "train"]
    for root in roots:
        for option in _options(group):
            cfg = compose_cfg(root, [f"{group}={option}"])
            if group == "hardware":
                assert set(cfg["trainer"]) >= {"accelerator", "devices", "precision", "strategy"}
                assert "devices" in cfg["trainer"]
            elif group == "schedule":
                assert cfg["schedule"]["t_list"][0] == 0
            else:
                assert cfg["logger"]["name"] == option


def test_devices_is_a_direct_override() -> None:
    cfg = compose_cfg("train", ["hardware=gpu", "trainer.devices=8"])
    assert cfg["trainer"]["devices"] == 8 and cfg["trainer"]["precision"] == "bf16-mixed"


def test_bundled_reference_resolves_to_package_assets() -> None:
    from dd.checkpoint import CheckpointError
    from dd.models.llamagen.spec import ASSETS_DIR, resolve_bundled

    assert resolve_bundled("hf://a/b/c.pt") == "hf://a/b/c.pt"
    with pytest.raises(CheckpointError, match="bundled weights .* are missing"):
        resolve_bundled("bundled://does_not_exist.pt")
    assert ASSETS_DIR == REPO_ROOT / "dd" / "assets"


CORE = ["dd.checkpoint", "dd.models.codebook", "dd.models.protocol", "dd.models.llamagen", "dd.models.var", "dd.flow", "dd.sampling.logits",
        "dd.sampling.choosers", "dd.sampling.seeds", "dd.sampling.dd_samplers", "dd.pairs", "dd.distill.losses",
        "dd.distill.ema", "dd.distill.perceptual", "dd.metrics", "dd.data", "dd.runs"]


def test_core_modules_import_neither_lightning_nor_hydra() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra'))\n"
            "print(','.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"core modules pulled in {result.stdout.strip()}"


def test_checkpoints_never_hold_dictconfig(tmp_path: Path) -> None:
    """Resolved configs are stored as plain containers (a DictConfig inside a checkpoint breaks weights_only)."""
    from dd.runs import save_resolved_config

    cfg = compose_cfg("train", ["model=gpt_test"])
    assert type(cfg) is dict
    path = save_resolved_config(tmp_path, cfg)
    torch.save({"config": cfg}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["config"]["model"]["name"] == "gpt_test"
    assert path.read_text().startswith("{")
