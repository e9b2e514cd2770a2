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
from dd.generate_pairs import run as run_pairs
from dd.models.presets import ASSETS_DIR
from dd.models.var import make_spec
from dd.models.var.training import next_scale_loss
from dd.pairs import PairDataset, PairExpectation
from dd.sampling.dd_samplers import fewstep_sample
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


NUM_PAIRS = 2000
VAL_EVERY = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("var_bundled")
    run_pairs(compose_cfg("generate_pairs", ["model=var_tiny", f"num_pairs={NUM_PAIRS}", "shard_size=500",
                                             "batch_size=250", f"output_dir={root / 'gen'}"]))
    pairs = root / "gen" / "pairs"
    summary = run_train(compose_cfg("train", [
        "model=var_tiny", f"data.pairs_dir={pairs}", f"output_dir={root / 'train'}", "max_steps=300",
        "batch_size=64", f"data.val_every={VAL_EVERY}", "val_every_steps=300", "ckpt_every=300", "logger=csv",
        "optim.lr=1e-3", "optim.warmup_steps=30", "ema_decay=0.99"]))
    return {"pairs": pairs, "summary": summary, "logs": root / "train" / "logs" / "metrics.csv"}


@pytest.mark.slow
def test_var_training_beats_the_marginal_baseline(spec, trained: dict) -> None:
    """Held-out token accuracy at t = 0 well above predicting each position's most frequent token.

    Also printed (not asserted): accuracy after the first t2 scales with those scales given as data vs from noise
    alone, and sampled 1-step vs 2-step accuracy. Measured with this setting (2000 pairs, 300 steps, 2026-11-29):
    baseline 0.186, t=0 0.329; after scale 4: 0.285 from noise vs 0.287 with the true prefix; sampled 1-step 0.329,
    2-step 0.329. At this budget the student does not yet exploit the given scales (README, demo results), so no
    assertion is made about them."""
    family = spec.build_family()
    expect = PairExpectation(130, 16, 256, 10)
    train = PairDataset(trained["pairs"], expect, sample_filter=lambda i: i % VAL_EVERY != 0)
    held = PairDataset(trained["pairs"], expect, sample_filter=lambda i: i % VAL_EVERY == 0)
    mode = torch.mode(train.data["indices"].long(), dim=0).values
    held_ids = held.data["indices"].long()
    baseline = (held_ids == mode[None]).float().mean().item()
    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=trained["summary"]["export"])
    batch = [held[i] for i in range(len(held))]
    labels = torch.stack([b["label"] for b in batch])
    noise = torch.stack([b["noise"] for b in batch])
    second = spec.default_t_list[1]
    rest = slice(family.data_length(second), None)

    def accuracy(t: int) -> tuple[float, float]:
        """(all positions, positions after the first ``second`` scales) at timestep t with the true prefix."""
        x_t = student.perturb(family.codebook()[held_ids], t, noise)
        with torch.no_grad():
            _, logits = student(x_t, labels, torch.full((len(batch),), t, dtype=torch.long))
        hits = (logits.argmax(-1) == held_ids).float()
        return hits.mean().item(), hits[:, rest].mean().item()

    (acc_t0, rest_t0), (_, rest_t2) = accuracy(0), accuracy(second)
    one = fewstep_sample(student, labels, noise, [0], spec.default_split_t)
    two = fewstep_sample(student, labels, noise, list(spec.default_t_list), spec.default_split_t)
    one_acc, two_acc = ((student.nearest_indices(r.sequence) == held_ids).float().mean().item() for r in (one, two))
    print(f"baseline {baseline:.3f} t=0 {acc_t0:.3f}; after scale {second}: t=0 {rest_t0:.3f} t={second} "
          f"{rest_t2:.3f}; sampled 1-step {one_acc:.3f} 2-step {two_acc:.3f}")
    assert acc_t0 > baseline + 0.05, (acc_t0, baseline)


@pytest.mark.slow
def test_var_training_lowered_the_loss(trained: dict) -> None:
    lines = trained["logs"].read_text().splitlines()
    col = lines[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
