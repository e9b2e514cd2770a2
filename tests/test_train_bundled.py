"""Acceptance of student training on the bundled tiny Fashion-MNIST teacher (real learned structure).

A short run must lower the loss and lift held-out token accuracy at t = 0 well above the baseline of predicting each
position's most frequent token, and two-step sampling must beat one-step on held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd.generate_pairs import run as run_pairs
from dd.models.llamagen import make_spec
from dd.pairs import PairDataset, PairExpectation
from dd.sampling.dd_samplers import fewstep_sample
from dd.train import run as run_train

from test_pairs import compose_cfg

NUM_PAIRS = 2560
VAL_EVERY = 10

# About 5 minutes on 2 cores (pairs plus 500 real training steps): in `python -m pytest -m slow`, which CI runs too.
pytestmark = pytest.mark.slow
#: the second step at token 24 re-predicts 40 of 64 tokens (the preset's default [0, 48] re-predicts 16: a smaller,
#: noisier difference for a 500-step run); the setting these tests were measured with
T_LIST = (0, 24)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bundled")
    run_pairs(compose_cfg("generate_pairs", ["model=gpt_tiny", f"num_pairs={NUM_PAIRS}", "shard_size=640",
                                             "batch_size=128", f"output_dir={root / 'gen'}"]))
    pairs = root / "gen" / "pairs"
    summary = run_train(compose_cfg("train", [
        "model=gpt_tiny", f"data.pairs_dir={pairs}", f"output_dir={root / 'train'}", "max_steps=500",
        "batch_size=64", f"data.val_every={VAL_EVERY}", "val_every_steps=250", "ckpt_every=500", "logger=csv",
        "optim.lr=1e-3", "optim.warmup_steps=50", "ema_decay=0.99", f"schedule.t_list={list(T_LIST)}",
        "loss.t0_weight=1"]))  # uniform t draws, as measured (the preset's weight 6 trains the t = 24 branch less)
    return {"pairs": pairs, "summary": summary, "root": root}


def test_training_beats_the_marginal_baseline_and_two_steps_beat_one(trained: dict) -> None:
    spec = make_spec(**compose_cfg("train", ["model=gpt_tiny"])["model"])
    family = spec.build_family()
    expect = PairExpectation(64, 8, 256, 10)
    train = PairDataset(trained["pairs"], expect, sample_filter=lambda i: i % VAL_EVERY != 0)
    held = PairDataset(trained["pairs"], expect, sample_filter=lambda i: i % VAL_EVERY == 0)
    # baseline: each position's most frequent token in the training pairs
    mode = torch.mode(train.data["indices"].long(), dim=0).values
    held_ids = held.data["indices"].long()
    baseline = (held_ids == mode[None]).float().mean().item()

    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=trained["summary"]["export"])
    untrained = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    batch = [held[i] for i in range(len(held))]
    labels = torch.stack([b["label"] for b in batch])
    noise = torch.stack([b["noise"] for b in batch])

    def acc_t0(model) -> float:
        with torch.no_grad():
            _, logits = model(noise, labels, torch.zeros(len(batch), dtype=torch.long))
        return (logits.argmax(-1) == held_ids).float().mean().item()

    def sample_acc(t_list) -> float:
        result = fewstep_sample(student, labels, noise, t_list, spec.default_split_t)
        return (student.nearest_indices(result.sequence) == held_ids).float().mean().item()

    trained_acc, untrained_acc = acc_t0(student), acc_t0(untrained)
    one, two = sample_acc([0]), sample_acc(list(T_LIST))
    print(f"baseline {baseline:.3f} untrained {untrained_acc:.3f} trained t=0 {trained_acc:.3f} "
          f"1-step {one:.3f} 2-step {two:.3f}")
    # measured with this setting (2560 pairs, 500 steps of 64, 1 thread, 2026-11-22): marginal baseline 0.049,
    # teacher-initialised student before training 0.006, after training t=0 accuracy 0.195, sampled sequences
    # 1-step 0.145 vs 2-step 0.152 (token accuracy against the held-out pairs' targets)
    assert trained_acc > baseline + 0.05, (trained_acc, baseline)
    assert trained_acc > untrained_acc + 0.05
    assert two > one, (one, two)


def test_training_lowered_the_loss(trained: dict) -> None:
    rows = (trained["root"] / "train" / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("train/loss")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)
