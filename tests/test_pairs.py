"""Pair generation: distribution of flow-mapped sequences, shard format, resume, kill-and-restart, 1 vs 2 ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dd.flow import FlowMapConfig
from dd.generate_pairs import run
from dd.models.llamagen import generate, make_spec
from dd.pairs import PairDataset, PairExpectation, PairFormatError, generate_pair_batch, make_labels
from dd.pairs.shards import check_settings_match, read_manifest, shard_path
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.seeds import per_sample_normal, per_sample_uniform, sample_seeds

from conftest import REPO_ROOT


def compose_cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _pair_overrides(out: Path, **extra: object) -> list[str]:
    base = {"model": "gpt_test", "num_pairs": 90, "shard_size": 32, "batch_size": 16, "output_dir": str(out)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _all_indices(directory: Path) -> torch.Tensor:
    manifest = read_manifest(directory)
    shards = [torch.load(directory / e["file"], weights_only=True) for e in manifest["shards"]]
    return torch.cat([s["indices"].long() for s in shards])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    manifest = run(compose_cfg("generate_pairs", _pair_overrides(out)))
    assert manifest["complete"] and manifest["num_written"] == 90
    return out / "pairs"


def _tv(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Mean over positions of the total-variation distance between two empirical token distributions."""
    ha = torch.stack([torch.bincount(a[:, i], minlength=vocab) for i in range(a.shape[1])]).double()
    hb = torch.stack([torch.bincount(b[:, i], minlength=vocab) for i in range(b.shape[1])]).double()
    return float((ha / ha.sum(1, keepdim=True) - hb / hb.sum(1, keepdim=True)).abs().sum(1).mean() / 2)


def test_flow_mapped_sequences_follow_the_teacher_distribution() -> None:
    """Per-position histograms of flow-mapped generation agree with multinomial generation within sampling noise:
    TV(flow, multinomial) is compared with TV(multinomial, independent multinomial) of the same size."""
    cfg = compose_cfg("generate_pairs", ["model=gpt_test"])
    spec = make_spec(**cfg["model"])
    family = spec.build_family()
    n = 3000
    seeds = sample_seeds(0, 0, n)
    labels = make_labels(seeds, family.num_classes, "balanced", range(n))
    flow = generate_pair_batch(family, seeds, labels, spec.sampling, FlowMapConfig(**cfg["flow"])).indices
    draws = []
    for base in (10**6, 2 * 10**6):
        uniforms = per_sample_uniform(sample_seeds(base, 0, n), family.sequence_length)
        draws.append(generate(family.teacher, labels, family.sequence_length, spec.sampling,
                              SeededMultinomialChooser(uniforms)).tokens)
    vocab = family.codebook().shape[0]
    tv_flow = _tv(flow, draws[0], vocab)
    tv_noise = _tv(draws[1], draws[0], vocab)
    assert tv_flow < 1.2 * tv_noise, (tv_flow, tv_noise)
    # and the distribution is far from a degenerate one: the same check against shifted tokens fails
    assert _tv((flow + 1) % vocab, draws[0], vocab) > 2 * tv_noise


def test_pairs_are_deterministic_and_regenerate_noise(reference_run: Path) -> None:
    cfg = compose_cfg("generate_pairs", ["model=gpt_test"])
    spec = make_spec(**cfg["model"])
    family = spec.build_family()
    expect = PairExpectation(family.sequence_length, family.token_dim, 64, family.num_classes)
    data = PairDataset(reference_run, expect)
    assert len(data) == 90
    item = data[37]
    assert int(item["sample_id"]) == 37
    assert torch.equal(item["noise"], per_sample_normal([37], (16, 8))[0])
    batch = generate_pair_batch(family, [37], item["label"][None], spec.sampling, FlowMapConfig(**cfg["flow"]))
    assert torch.equal(batch.indices[0], item["indices"])
    holdout = PairDataset(reference_run, expect, sample_filter=lambda i: i % 10 == 0)
    assert len(holdout) == 9
    manifest = read_manifest(reference_run)
    assert manifest["seed_range"] == [0, 89] and len(manifest["teacher"]["sha256"]) == 64
    assert all(len(e["sha256"]) == 64 for e in manifest["shards"])


def test_reader_rejects_mismatched_model_and_corruption(reference_run: Path, tmp_path: Path) -> None:
    with pytest.raises(PairFormatError, match="sequence_length pairs=16 model=64"):
        PairDataset(reference_run, PairExpectation(64, 8, 64, 4))
    with pytest.raises(PairFormatError, match="different teacher"):
        PairDataset(reference_run, PairExpectation(16, 8, 64, 4, teacher_sha256="0" * 64))
    copy = tmp_path / "pairs"
    copy.mkdir()
    for f in reference_run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard-000001.pt"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PairFormatError, match="checksum"):
        PairDataset(copy, PairExpectation(16, 8, 64, 4))


def test_resume_skips_complete_shards_and_repairs_damage(reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = _pair_overrides(out)
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


def test_resume_with_other_settings_is_refused(reference_run: Path) -> None:
    existing = read_manifest(reference_run)
    with pytest.raises(PairFormatError, match="other settings.*seed_base"):
        check_settings_match(existing, {**existing, "seed_base": 5})


def _cli(out: Path, shard_size: int = 16, batch_size: int = 16, *extra: str) -> list[str]:
    overrides = _pair_overrides(out, num_pairs=160, shard_size=shard_size, batch_size=batch_size)
    return [sys.executable, "-m", "dd.generate_pairs", *overrides, *extra]


def test_kill_and_restart_loses_and_duplicates_nothing(reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli(out, batch_size=4), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
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
    subprocess.run(_cli(out, batch_size=4), cwd=tmp_path, env=env, check=True, capture_output=True)
    manifest = read_manifest(pairs)
    assert manifest["complete"] and manifest["num_written"] == 160
    ids = torch.cat([torch.load(pairs / e["file"], weights_only=True)["sample_ids"] for e in manifest["shards"]])
    assert torch.equal(ids, torch.arange(160))
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cli(ref, batch_size=32), cwd=tmp_path, env=env, check=True, capture_output=True)
    assert torch.equal(_all_indices(pairs), _all_indices(ref / "pairs"))


def test_two_cpu_ranks_write_the_same_pairs_as_one(tmp_path: Path) -> None:
    env = dict(os.environ)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one), cwd=tmp_path, env=env, check=True, capture_output=True)
    result = subprocess.run(_cli(two, 24, 16, "trainer.devices=2"), cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(two / "pairs")["complete"]
    assert torch.equal(_all_indices(one / "pairs"), _all_indices(two / "pairs"))


def test_bad_settings_fail_before_loading(tmp_path: Path) -> None:
    from dd.runs import ConfigError

    with pytest.raises(ConfigError, match="num_pairs=0 must be >= 1"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, num_pairs=0)))
    with pytest.raises(ConfigError, match="flow: FlowMapConfig.solver"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, **{"flow.solver": "rk45"})))
    with pytest.raises(ConfigError, match="top_p"):
        run(compose_cfg("generate_pairs", _pair_overrides(tmp_path, **{"model.sampling.top_p": 0})))
