"""Pair generation: distribution of flow-mapped sequences, shard format, resume, kill-and-restart, 1 vs 2 ranks.

Everything about the shard format, resuming and ranks runs for both families' random presets (gpt_test: 16 tokens
one at a time; var_test: 4 scales = 30 tokens, a whole scale per step). The subprocess tests (kill-and-restart,
two ranks) take ~20 s per preset, mostly interpreter and Lightning start-up; for VAR they are the only check that
whole-scale flow mapping is independent of batch size and of the rank sharding, so both presets run by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dd.flow import FlowMapConfig
from dd.generate_pairs import run
from dd.pairs import PairDataset, PairExpectation, PairFormatError, generate_pair_batch, make_labels
from dd.pairs.shards import check_settings_match, read_manifest, shard_path
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.seeds import per_sample_normal, per_sample_uniform, sample_seeds

from conftest import REPO_ROOT

PRESETS = ("gpt_test", "var_test")
#: (sequence_length, token_dim, vocab_size, num_classes) the random test presets must have
LAYOUTS = {"gpt_test": PairExpectation(16, 8, 64, 4), "var_test": PairExpectation(30, 8, 64, 4)}


def compose_cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def build_spec(cfg: dict) -> Any:
    """The preset spec of a composed config, as the entry points build it (the family comes from ``_target_``)."""
    return instantiate(cfg["model"], _convert_="all")


def _pair_overrides(out: Path, **extra: object) -> list[str]:
    base = {"model": "gpt_test", "num_pairs": 90, "shard_size": 32, "batch_size": 16, "output_dir": str(out)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _all_indices(directory: Path) -> torch.Tensor:
    manifest = read_manifest(directory)
    shards = [torch.load(directory / e["file"], weights_only=True) for e in manifest["shards"]]
    return torch.cat([s["indices"].long() for s in shards])


@pytest.fixture(scope="module", params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference_run(preset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"ref_{preset}")
    manifest = run(compose_cfg("generate_pairs", _pair_overrides(out, model=preset)))
    assert manifest["complete"] and manifest["num_written"] == 90
    return out / "pairs"


def _tv(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Mean over positions of the total-variation distance between two empirical token distributions."""
    ha = torch.stack([torch.bincount(a[:, i], minlength=vocab) for i in range(a.shape[1])]).double()
    hb = torch.stack([torch.bincount(b[:, i], minlength=vocab) for i in range(b.shape[1])]).double()
    return float((ha / ha.sum(1, keepdim=True) - hb / hb.sum(1, keepdim=True)).abs().sum(1).mean() / 2)


def _flow_and_multinomial(preset: str, n: int) -> tuple[Any, torch.Tensor, list[torch.Tensor]]:
    """The family, flow-mapped token ids of n samples with balanced labels, and two independent multinomial
    generations (seeded uniforms) of the same labels through the family's teacher."""
    cfg = compose_cfg("generate_pairs", [f"model={preset}"])
    spec = build_spec(cfg)
    family = spec.build_family()
    seeds = sample_seeds(0, 0, n)
    labels = make_labels(seeds, family.num_classes, "balanced", range(n))
    flow = generate_pair_batch(family, seeds, labels, spec.sampling, FlowMapConfig(**cfg["flow"])).indices
    draws = []
    for base in (10**6, 2 * 10**6):
        uniforms = per_sample_uniform(sample_seeds(base, 0, n), family.sequence_length)
        chooser = SeededMultinomialChooser(uniforms)
        draws.append(family.teacher_generate(labels, 0, family.num_timesteps, None, spec.sampling, chooser))
    return family, flow, draws


def test_flow_mapped_sequences_follow_the_teacher_distribution() -> None:
    """Per-position histograms of flow-mapped generation agree with multinomial generation within sampling noise:
    TV(flow, multinomial) is compared with TV(multinomial, independent multinomial) of the same size."""
    family, flow, draws = _flow_and_multinomial("gpt_test", 3000)
    vocab = family.codebook().shape[0]
    tv_flow = _tv(flow, draws[0], vocab)
    tv_noise = _tv(draws[1], draws[0], vocab)
    assert tv_flow < 1.2 * tv_noise, (tv_flow, tv_noise)
    # and the distribution is far from a degenerate one: the same check against shifted tokens fails
    assert _tv((flow + 1) % vocab, draws[0], vocab) > 2 * tv_noise


def test_flow_mapped_scales_follow_the_teacher_distribution() -> None:
    """VAR: the flow map chooses a whole scale at once. Per-position histograms agree with multinomial generation as
    above, and so do the histograms of each scale's tokens pooled. Scale 0 is a single position, whose TV ratio
    alone fluctuates by ~15% (std, simulated for one 64-way distribution), hence the looser per-scale bound."""
    family, flow, draws = _flow_and_multinomial("var_test", 3000)
    assert flow.shape == draws[0].shape == (3000, 30)
    vocab = family.codebook().shape[0]
    tv_flow = _tv(flow, draws[0], vocab)
    tv_noise = _tv(draws[1], draws[0], vocab)
    assert tv_flow < 1.2 * tv_noise, (tv_flow, tv_noise)
    assert _tv((flow + 1) % vocab, draws[0], vocab) > 2 * tv_noise
    ends = [family.data_length(t) for t in range(family.num_timesteps + 1)]
    assert ends == [0, 1, 5, 14, 30]
    for scale, (begin, stop) in enumerate(zip(ends, ends[1:])):
        pooled = [ids[:, begin:stop].reshape(-1, 1) for ids in (flow, *draws)]
        scale_flow, scale_noise = _tv(pooled[0], pooled[1], vocab), _tv(pooled[2], pooled[1], vocab)
        assert scale_flow < 1.5 * scale_noise, (scale, scale_flow, scale_noise)
        assert _tv((pooled[0] + 1) % vocab, pooled[1], vocab) > 2 * scale_noise, scale


def test_pairs_are_deterministic_and_regenerate_noise(preset: str, reference_run: Path) -> None:
    cfg = compose_cfg("generate_pairs", [f"model={preset}"])
    spec = build_spec(cfg)
    family = spec.build_family()
    expect = PairExpectation(family.sequence_length, family.token_dim, 64, family.num_classes)
    assert expect == LAYOUTS[preset]
    data = PairDataset(reference_run, expect)
    assert len(data) == 90
    item = data[37]
    assert int(item["sample_id"]) == 37
    assert torch.equal(item["noise"], per_sample_normal([37], (expect.sequence_length, expect.token_dim))[0])
    batch = generate_pair_batch(family, [37], item["label"][None], spec.sampling, FlowMapConfig(**cfg["flow"]))
    assert torch.equal(batch.indices[0], item["indices"])
    holdout = PairDataset(reference_run, expect, sample_filter=lambda i: i % 10 == 0)
    assert len(holdout) == 9
    manifest = read_manifest(reference_run)
    assert manifest["seed_range"] == [0, 89] and len(manifest["teacher"]["sha256"]) == 64
    assert all(len(e["sha256"]) == 64 for e in manifest["shards"])


def test_reader_rejects_mismatched_model_and_corruption(preset: str, reference_run: Path, tmp_path: Path) -> None:
    expect = LAYOUTS[preset]
    with pytest.raises(PairFormatError, match=f"sequence_length pairs={expect.sequence_length} model=64"):
        PairDataset(reference_run, replace(expect, sequence_length=64))
    with pytest.raises(PairFormatError, match="different teacher"):
        PairDataset(reference_run, replace(expect, teacher_sha256="0" * 64))
    with pytest.raises(PairFormatError, match="different tokenizer"):
        PairDataset(reference_run, replace(expect, tokenizer_sha256="0" * 64))
    tokenizer_sha = read_manifest(reference_run)["tokenizer"]["sha256"]
    assert len(PairDataset(reference_run, replace(expect, tokenizer_sha256=tokenizer_sha))) > 0
    copy = tmp_path / "pairs"
    copy.mkdir()
    for f in reference_run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard-000001.pt"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PairFormatError, match="checksum"):
        PairDataset(copy, expect)


def test_resume_skips_complete_shards_and_repairs_damage(preset: str, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = _pair_overrides(out, model=preset)
    run(compose_cfg("generate_pairs", overrides))
    pairs = out / "pairs"
    kept = shard_path(pairs, 0).stat().st_mtime_ns
    shard_path(pairs, 1).unlink()
    shard_path(pairs, 2).write_bytes(b"partial write")
    (pairs / "shard-000000.pt.tmp123").write_bytes(b"stale")
    manifest = run(compose_cfg("generate_pairs", overrides))
    assert manifest["complete"] and manifest["num_written"] == 90
    assert shard_path(pairs, 0).stat().st_mtime_ns == kept, "a complete shard was regenerated"
    assert not list(pairs.glob("*.tmp*"))
    assert torch.equal(_all_indices(pairs), _all_indices(reference_run))
    # damage that still loads (other token ids, the same sample ids): the recorded checksum catches it on a re-run,
    # which regenerates the shard instead of recording the damaged bytes as its checksum
    shard = torch.load(shard_path(pairs, 1), weights_only=True)
    shard["indices"][0, 0] = (int(shard["indices"][0, 0]) + 1) % 64
    torch.save(shard, shard_path(pairs, 1))
    with pytest.warns(UserWarning, match="regenerating it"):
        manifest = run(compose_cfg("generate_pairs", overrides))
    assert torch.equal(_all_indices(pairs), _all_indices(reference_run))
    assert manifest["shards"][1]["sha256"] == read_manifest(reference_run)["shards"][1]["sha256"]


@pytest.mark.parametrize("preset", PRESETS)
def test_support_restricted_flow_map_gives_the_dense_pairs(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher sampling with top-k 12 and top-p 0.9 of V = 64: the default flow map (``support=auto``) solves every
    position (gpt_test) / scale (var_test) over the supports only, and the pairs are the dense solve's."""
    from dd.flow import token_map

    cfg = compose_cfg("generate_pairs", [f"model={preset}"])
    spec = build_spec(cfg)
    family = spec.build_family()
    sampling = replace(spec.sampling, top_k=12, top_p=0.9)
    seeds = sample_seeds(0, 0, 6)
    labels = make_labels(seeds, family.num_classes, "balanced", range(6))
    widths: list[int] = []
    original = token_map._support_indices
    monkeypatch.setattr(token_map, "_support_indices", lambda lp, k: widths.append(k) or original(lp, k))
    flow = FlowMapConfig(**cfg["flow"])
    assert flow.support == "auto"
    restricted = generate_pair_batch(family, seeds, labels, sampling, flow)
    assert len(widths) == family.num_timesteps and 1 <= min(widths) and max(widths) <= 12
    dense = generate_pair_batch(family, seeds, labels, sampling, replace(flow, support="dense"))
    assert len(widths) == family.num_timesteps  # the dense run never gathers
    assert torch.equal(restricted.indices, dense.indices)
    torch.testing.assert_close(restricted.max_snap_residual, dense.max_snap_residual, atol=1e-5, rtol=1e-4)


def test_pair_directories_resume_across_flow_supports() -> None:
    """``flow.support`` changes how the map runs, not the pairs: a directory resumes with another setting (also one
    written before the setting existed)."""
    from dataclasses import asdict

    existing = {"flow": asdict(FlowMapConfig()), "seed_base": 0}
    del existing["flow"]["support"]
    check_settings_match(existing, {"flow": asdict(FlowMapConfig(support="dense")), "seed_base": 0})
    check_settings_match({"flow": asdict(FlowMapConfig(support="compact")), "seed_base": 0},
                         {"flow": asdict(FlowMapConfig()), "seed_base": 0})


def test_resume_with_other_settings_is_refused(reference_run: Path) -> None:
    existing = read_manifest(reference_run)
    with pytest.raises(PairFormatError, match="other settings.*seed_base"):
        check_settings_match(existing, {**existing, "seed_base": 5})
    other_codebook = {**existing["tokenizer"], "sha256": "0" * 64}
    with pytest.raises(PairFormatError, match="other settings.*tokenizer"):
        check_settings_match(existing, {**existing, "tokenizer": other_codebook})
    moved = {**existing["tokenizer"], "checkpoint": "/elsewhere/vq.pt"}  # the same weights from another path resume
    check_settings_match(existing, {**existing, "tokenizer": moved})


def _cli(out: Path, preset: str, shard_size: int = 16, batch_size: int = 16, *extra: str) -> list[str]:
    overrides = _pair_overrides(out, model=preset, num_pairs=160, shard_size=shard_size, batch_size=batch_size)
    return [sys.executable, "-m", "dd.generate_pairs", *overrides, *extra]


@pytest.mark.slow_for("var_test")  # subprocess runs; the gpt_test instance stays in the default suite
def test_kill_and_restart_loses_and_duplicates_nothing(preset: str, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli(out, preset, batch_size=4), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    pairs = out / "pairs"
    while time.monotonic() < deadline and len(list(pairs.glob("shard-*.pt"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(pairs.glob("shard-*.pt")))
    assert 2 <= written < 10, f"kill landed after {written} of 10 shards"
    assert not read_manifest(pairs)["complete"]
    subprocess.run(_cli(out, preset, batch_size=4), cwd=tmp_path, env=env, check=True, capture_output=True)
    manifest = read_manifest(pairs)
    assert manifest["complete"] and manifest["num_written"] == 160
    ids = torch.cat([torch.load(pairs / e["file"], weights_only=True)["sample_ids"] for e in manifest["shards"]])
    assert torch.equal(ids, torch.arange(160))
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cli(ref, preset, batch_size=32), cwd=tmp_path, env=env, check=True, capture_output=True)
    assert torch.equal(_all_indices(pairs), _all_indices(ref / "pairs"))


@pytest.mark.slow_for("var_test")  # subprocess runs; the gpt_test instance stays in the default suite
def test_two_cpu_ranks_write_the_same_pairs_as_one(preset: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one, preset), cwd=tmp_path, env=env, check=True, capture_output=True)
    result = subprocess.run(_cli(two, preset, 24, 16, "trainer.devices=2"), cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(two / "pairs")["complete"]
    assert torch.equal(_all_indices(one / "pairs"), _all_indices(two / "pairs"))
    # fewer shards than ranks (here one shard of 160): the rank without a shard still reaches the writers' barrier
    lone = tmp_path / "lone"
    result = subprocess.run(_cli(lone, preset, 160, 16, "trainer.devices=2"), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(lone / "pairs")["complete"]
    assert torch.equal(_all_indices(one / "pairs"), _all_indices(lone / "pairs"))


def test_bad_settings_fail_before_loading(tmp_path: Path) -> None:
    from dd.runs import ConfigError

    with pytest.raises(ConfigError, match="num_pairs=0 must be >= 1"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, num_pairs=0)))
    with pytest.raises(ConfigError, match="flow: FlowMapConfig.solver"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, **{"flow.solver": "rk45"})))
    with pytest.raises(ConfigError, match="top_p"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, **{"model.sampling.top_p": 0})))
