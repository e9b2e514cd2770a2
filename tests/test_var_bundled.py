"""The bundled tiny VAR teacher (dd/assets/var_tiny_{vqvae,teacher}.pt, preset ``var_tiny``): strict loading in the
official raw layout, its measured quality, and DD training on it (pairs -> student -> held-out accuracy).

The quality pins were measured when the files were trained (dd/assets/var_tiny_record.json) on the first 256
Fashion-MNIST test images, float32 from the fp16 files; thresholds leave slack for other CPUs and torch versions
while still failing on a wrong or untrained file.
"""

from __future__ import annotations

import pytest
import torch

from dd.data.fashion_mnist import FashionMNISTDataset
from dd.data.image_folder import uint8_to_model_images
from dd.evaluation.step_comparison import compare_steps, paired_mean_z, paired_token_z
from dd.generate_pairs import run as run_pairs
from dd.models.presets import ASSETS_DIR
from dd.models.var import make_spec
from dd.models.var.training import next_scale_loss
from dd.pairs import PairDataset, PairExpectation
from dd.train import run as run_train

from conftest import needs_fmnist
from test_pairs import compose_cfg

NUM_IMAGES = 256
PINNED_CE = 2.329  # first 256 test images, bundled fp16 weights in float32 (2026-11-29); full test set 2.413
MAX_CE_SLACK = 0.15


@pytest.fixture(scope="module")
def spec():
    return make_spec(**compose_cfg("train", ["model=var_tiny"])["model"])


def test_bundled_files_are_small_fp16_raw_state_dicts() -> None:
    for name in ("var_tiny_vqvae.pt", "var_tiny_teacher.pt"):
        payload = torch.load(ASSETS_DIR / name, map_location="cpu", weights_only=True)
        assert (ASSETS_DIR / name).stat().st_size < 4_000_000
        assert all(isinstance(v, torch.Tensor) for v in payload.values()), "official VAR files are raw state dicts"
        assert all(t.dtype == torch.float16 for t in payload.values() if t.is_floating_point())


def test_bundled_weights_load_strictly_through_the_preset(spec) -> None:
    family = spec.build_family()  # strict loading raises on any key mismatch
    assert family.sequence_length == 130 and family.num_timesteps == 6 and family.token_dim == 16
    assert [family.data_length(t) for t in range(7)] == [0, 1, 5, 14, 30, 66, 130]


@needs_fmnist
def test_bundled_teacher_still_predicts_test_token_maps(spec) -> None:
    family = spec.build_family()
    data = FashionMNISTDataset("test")
    images = uint8_to_model_images(data.images[:NUM_IMAGES]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        ids = torch.cat(family.tokenizer.img_to_indices(images), dim=1)
        ce = float(next_scale_loss(family.teacher, family.tokenizer, data.labels[:NUM_IMAGES], ids))
    assert ce < PINNED_CE + MAX_CE_SLACK, (ce, PINNED_CE)
    assert ce < 0.6 * torch.log(torch.tensor(256.0)).item()  # far below the uniform 5.545 nats


NUM_PAIRS = 5000
VAL_EVERY = 10
NUM_HELD_OUT = 2000
HELD_OUT_SEED = 1_000_000  # pair seeds 1e6.. never meet the training pairs' 0..4999


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The preset's own recipe (lr 2e-3, EMA, t_list [0, 4], split 6) at the demo's length: 400 steps of 64 on 4500
    pairs, and 2000 held-out pairs from other seeds."""
    root = tmp_path_factory.mktemp("var_bundled")
    for name, count, seed in (("gen", NUM_PAIRS, 0), ("held", NUM_HELD_OUT, HELD_OUT_SEED)):
        run_pairs(compose_cfg("generate_pairs", ["model=var_tiny", f"num_pairs={count}", "shard_size=1000",
                                                 "batch_size=250", f"seed_base={seed}", f"output_dir={root / name}"]))
    pairs = root / "gen" / "pairs"
    summary = run_train(compose_cfg("train", [
        "model=var_tiny", f"data.pairs_dir={pairs}", f"output_dir={root / 'train'}", "max_steps=400",
        "batch_size=64", f"data.val_every={VAL_EVERY}", "val_every_steps=400", "ckpt_every=400", "logger=csv"]))
    return {"pairs": pairs, "held": root / "held" / "pairs", "summary": summary,
            "logs": root / "train" / "logs" / "metrics.csv"}


def test_paired_statistics() -> None:
    a = torch.tensor([True, True, False, False, True, False])
    b = torch.tensor([True, False, True, True, True, False])
    assert paired_token_z(a, b) == pytest.approx((2 - 1) / 3 ** 0.5)
    assert paired_token_z(b, a) == pytest.approx(-(2 - 1) / 3 ** 0.5)
    assert paired_token_z(a, a) == 0.0
    assert paired_mean_z(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2.0 / (1.0 / 3 ** 0.5))
    assert paired_mean_z(torch.zeros(4)) == 0.0 and paired_mean_z(torch.ones(4)) == float("inf")


@pytest.mark.slow
def test_var_training_learns_and_two_steps_beat_one(spec, trained: dict) -> None:
    """On 2000 held-out pairs (dd.evaluation.step_comparison):

    * token accuracy at t = 0 well above predicting each position's most frequent token;
    * after the first t2 scales the student uses them when they are given as data (true prefix vs noise alone);
    * 2 steps beat 1: the scales the second step re-predicts (from the first step's own scales and the same noise)
      are more likely under the teacher given that prefix than the 1-step ones given theirs (teacher NLL per token,
      the teacher's guided sampling distribution, paired per sample).

    Measured (2026-11-29, README "2 steps beat 1 for VAR"): this test NLL 4.309 (1 step) vs 4.283 (2 steps), paired
    z 4.6, true prefix z 11.4; over ten other students (300-1200 steps; t2 3 or 4; other pairs, seeds, learning rates,
    t weights) NLL z 3.8-7.6, always in favour of 2 steps, true prefix z 7-22. Printed, not asserted: sampled token
    accuracy against the pairs after t2, where the 2-step gain is small and not always significant (z -0.2 to 7.1; a
    wrong first-step prefix makes the second step follow that prefix rather than the pair)."""
    family = spec.build_family()
    expect = PairExpectation(130, 16, 256, 10)
    train = PairDataset(trained["pairs"], expect, sample_filter=lambda i: i % VAL_EVERY != 0)
    held = PairDataset(trained["held"], expect)
    mode = torch.mode(train.data["indices"].long(), dim=0).values
    held_ids = held.data["indices"].long()
    baseline = (held_ids == mode[None]).float().mean().item()
    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=trained["summary"]["export"])
    batch = [held[i] for i in range(len(held))]
    labels = torch.stack([b["label"] for b in batch])
    noise = torch.stack([b["noise"] for b in batch])
    result = compare_steps(student, family, spec.sampling, labels, noise, held_ids, spec.default_t_list,
                           spec.default_split_t)
    print(f"baseline {baseline:.4f}", result)
    assert result.num_samples == NUM_HELD_OUT and result.rest_start == family.data_length(spec.default_t_list[1])
    assert result.acc_t0_all > baseline + 0.05, (result.acc_t0_all, baseline)
    assert result.prefix_kept
    assert result.acc_given > result.acc_noise and result.z_given > 4.0, result
    assert result.nll_2step < result.nll_1step and result.z_nll > 3.0, result
    assert result.nll_pairs < result.nll_2step  # the teacher's own tokens stay the likeliest


@pytest.mark.slow
def test_var_training_lowered_the_loss(trained: dict) -> None:
    lines = trained["logs"].read_text().splitlines()
    col = lines[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
