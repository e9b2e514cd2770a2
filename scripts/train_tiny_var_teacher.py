"""Train the bundled tiny VAR teacher (preset ``configs/model/var_tiny.yaml``) on Fashion-MNIST token maps.

The whole train split (60,000 images) is quantised once by the preset's multi-scale VQVAE (float32) into
(60000, 130) ids over the scales (1, 2, 3, 4, 6, 8); the class-conditional VAR transformer is then trained with the
teacher-forced next-scale cross-entropy (``dd.models.var.training.next_scale_loss``; labels dropped to the null class
with ``cond_drop_rate`` = 0.1 for guidance). Same optimiser, schedule and loop as the LlamaGen tiny teacher
(``scripts/train_tiny_teacher.py``, whose helpers this script reuses).

Writes (defaults): ``dd/assets/var_tiny_teacher.pt`` (raw fp16 state dict, the official VAR layout); section
``teacher`` of ``dd/assets/var_tiny_record.json``; ``docs/img/var_tiny_teacher_samples.png`` (one row per class).
Usage::

    python scripts/train_tiny_var_teacher.py [--steps 2500] [--time-budget 720] [--cfg-scale 1.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from dd.checkpoint import save_state_dict
from dd.data.fashion_mnist import FashionMNISTDataset
from dd.data.image_folder import uint8_to_model_images
from dd.models.llamagen.training import fp16_state_dict, update_training_record
from dd.models.var import MultiScaleVQVAE, VARSpec, VARTransformer, load_weights, make_spec, var_generate
from dd.models.var.training import next_scale_loss
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import per_sample_uniform
from train_tiny_teacher import repo_relative, sample_metrics, save_sample_grid, train  # scripts/ is on sys.path

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "configs" / "model" / "var_tiny.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (loop only)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of training")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--limit-images", type=int, default=None, help="first N images of each split (smoke tests)")
    parser.add_argument("--samples-per-class", type=int, default=100, help="for the sample metrics")
    parser.add_argument("--grid-per-class", type=int, default=10, help="columns of the sample PNG")
    parser.add_argument("--cfg-scale", type=float, default=None, help="VAR cfg of the samples; default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", type=Path, default=PRESET)
    parser.add_argument("--tokenizer", type=Path, default=None, help="VQVAE weights; default: the preset's")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from these teacher weights (a second stage: its record keeps the first's)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dd" / "assets" / "var_tiny_teacher.pt")
    parser.add_argument("--record", type=Path, default=None, help="default: var_tiny_record.json next to --out")
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "docs" / "img" / "var_tiny_teacher_samples.png")
    return parser.parse_args()


def load_vqvae(spec: VARSpec, path: Path | None) -> MultiScaleVQVAE:
    if path is None:
        return spec.build_tokenizer()
    return load_weights(spec.build_tokenizer(load=False), path, kind="tokenizer")


@torch.no_grad()
def encode_split(vqvae: MultiScaleVQVAE, data: FashionMNISTDataset, limit: int | None = None,
                 batch_size: int = 500) -> torch.Tensor:
    """Flat ids (N, L) of a split's first ``limit`` images, scale after scale, float32 encoder."""
    ids, count = [], min(limit or len(data), len(data))
    for start in tqdm(range(0, count, batch_size), desc=f"encode {data.split}", mininterval=5.0, disable=None):
        images = uint8_to_model_images(data.images[start:min(start + batch_size, count)])
        ids.append(torch.cat(vqvae.img_to_indices(images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()), dim=1))
    return torch.cat(ids)


@torch.no_grad()
def test_cross_entropy(teacher: VARTransformer, vqvae: MultiScaleVQVAE, ids: torch.Tensor, labels: torch.Tensor,
                       batch_size: int = 1000) -> float:
    teacher.eval()
    total = sum(float(next_scale_loss(teacher, vqvae, labels[s:s + batch_size], ids[s:s + batch_size]))
                * len(ids[s:s + batch_size]) for s in range(0, len(ids), batch_size))
    return total / len(ids)


@torch.no_grad()
def sample(teacher: VARTransformer, vqvae: MultiScaleVQVAE, labels: torch.Tensor, seeds: list[int],
           sampling: SamplingConfig) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1], per-sample seeded draws (as ``dd.eval sampler=teacher``)."""
    chooser = SeededMultinomialChooser(per_sample_uniform(seeds, teacher.sequence_length))
    result = var_generate(teacher, vqvae, labels, sampling, chooser)
    return torch.cat([vqvae.fhat_to_img(chunk) for chunk in result.f_hat.split(250)])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = make_spec(**yaml.safe_load(args.preset.read_text()))
    vqvae = load_vqvae(spec, args.tokenizer)
    train_data, test_data = FashionMNISTDataset("train"), FashionMNISTDataset("test")
    encode_start = time.time()
    train_ids = encode_split(vqvae, train_data, args.limit_images)
    test_ids = encode_split(vqvae, test_data, args.limit_images)
    encode_seconds = round(time.time() - encode_start, 1)

    teacher = spec.build_teacher(load=False)
    previous = None
    if args.init is not None:
        load_weights(teacher, args.init, kind="teacher")
        record_path = args.record or args.out.with_name("var_tiny_record.json")
        previous = json.loads(record_path.read_text()).get("teacher") if record_path.is_file() else None
    teacher.train()
    stats = train(teacher, train_ids, train_data.labels[: len(train_ids)], args,
                  loss_fn=lambda model, labels, ids: next_scale_loss(model, vqvae, labels, ids))
    save_state_dict(fp16_state_dict(teacher), args.out)
    reloaded = load_weights(spec.build_teacher(load=False), args.out, kind="teacher")
    eval_start = time.time()
    test_labels = test_data.labels[: len(test_ids)]
    ce = test_cross_entropy(reloaded, vqvae, test_ids, test_labels)
    ce_uncond = test_cross_entropy(reloaded, vqvae, test_ids, torch.full_like(test_labels, reloaded.null_class))
    sampling = spec.sampling if args.cfg_scale is None else SamplingConfig(cfg_scale=args.cfg_scale)
    labels = torch.arange(reloaded.num_classes).repeat_interleave(args.samples_per_class)
    samples = sample(reloaded, vqvae, labels, list(range(len(labels))), sampling)
    save_sample_grid(samples, labels, args.grid_per_class, args.image)
    metrics = {"test_sequences": len(test_ids), "test_cross_entropy": ce, "test_perplexity": math.exp(ce),
               "test_cross_entropy_unconditional": ce_uncond, "uniform_cross_entropy": math.log(reloaded.vocab_size),
               **sample_metrics(samples, labels, test_data), "sample_cfg_scale": sampling.cfg_scale,
               "eval_seconds": round(time.time() - eval_start, 1)}
    settings = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"date": datetime.date.today().isoformat(), "torch_version": str(torch.__version__),
              "dataset": f"Fashion-MNIST train token maps ({len(train_ids)} x {train_ids.shape[1]}); metrics on the "
                         f"test split", "weights": args.out.name, "weights_bytes": args.out.stat().st_size,
              "settings": settings, "encode_seconds": encode_seconds, **stats,
              "final_train": stats["curve"][-1] if stats["curve"] else None, **metrics}
    if previous is not None:
        record["continued_from"] = {k: previous.get(k) for k in ("settings", "steps", "train_seconds", "curve",
                                                                 "test_cross_entropy", "sample_proxy_fid")}
    record_path = update_training_record(args.record or args.out.with_name("var_tiny_record.json"), "teacher", record)
    print(f"steps {stats['steps']} in {stats['train_seconds']} s; test CE {ce:.4f} nats (unconditional "
          f"{ce_uncond:.4f}); sample accuracy {metrics['sample_classifier_accuracy']:.3f}, proxy FID "
          f"{metrics['sample_proxy_fid']:.2f} (real floor {metrics['real_test_proxy_fid_same_count']:.2f}); wrote "
          f"{args.out}, {record_path}, {args.image}")


if __name__ == "__main__":
    main()
