"""Train the bundled tiny LlamaGen GPT teacher (preset ``configs/model/gpt_tiny.yaml``) on Fashion-MNIST tokens.

The whole train split (60,000 images) is encoded once by the preset's tokenizer (float32, as users encode) into
(60000, 64) token ids; the class-conditional GPT is then trained on ids with the official next-token loss
(``dd.models.llamagen.training.next_token_loss``; labels dropped to the null class with the preset's
``class_dropout_prob`` = 0.1 for classifier-free guidance). AdamW (betas 0.9/0.95, weight decay 0.05 on matrices),
linear warm-up + cosine decay, bf16 autocast on CPU by default.

Writes (defaults):

* ``dd/assets/llamagen_tiny_gpt.pt``: ``{'model': fp16 state dict}`` (the official LlamaGen layout);
* section ``teacher`` of ``dd/assets/llamagen_tiny_record.json``: settings, loss curve, test cross-entropy and
  perplexity (conditional and unconditional), sample metrics, wall times;
* ``docs/img/tiny_teacher_samples.png``: one row per class (T-shirt/top ... Ankle boot), cfg 2.0, seeded.

Sample metrics (1,000 samples, 100 per class, cfg 2.0, per-sample seeds 0..999): accuracy of the bundled
Fashion-MNIST classifier on the samples w.r.t. the requested class, and the classifier-feature proxy FID against the
test split (with a 1,000-sample FID floor measured on real test images for scale). Usage::

    python scripts/train_tiny_teacher.py [--steps 2500] [--time-budget 720] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torchvision.utils import save_image
from tqdm import tqdm

from dd.data.fashion_mnist import FashionMNISTDataset
from dd.data.image_folder import model_images_to_uint8, uint8_to_model_images
from dd.metrics.classifier import TEST_STATS_FILENAME, asset_path, load_fmnist_classifier, predict_labels
from dd.metrics.fid import compute_stats, frechet_distance, load_reference_stats
from dd.models.llamagen import LlamaGenGPT, LlamaGenSpec, VQTokenizer, generate, load_weights, make_spec
from dd.models.llamagen.training import (
    decay_parameter_groups,
    next_token_loss,
    save_fp16_checkpoint,
    update_training_record,
    warmup_cosine_factor,
)
from dd.sampling.choosers import SeededMultinomialChooser
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import per_sample_uniform

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "configs" / "model" / "gpt_tiny.yaml"
LOG_EVERY = 50
GRID = (8, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (loop only)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of training")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--limit-images", type=int, default=None, help="use only the first N images of each split "
                        "(smoke tests)")
    parser.add_argument("--samples-per-class", type=int, default=100, help="for the sample metrics")
    parser.add_argument("--grid-per-class", type=int, default=10, help="columns of the sample PNG")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", type=Path, default=PRESET)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer weights; default: the preset's")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dd" / "assets" / "llamagen_tiny_gpt.pt")
    parser.add_argument("--record", type=Path, default=None, help="default: llamagen_tiny_record.json next to --out")
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "docs" / "img" / "tiny_teacher_samples.png")
    return parser.parse_args()


def repo_relative(path: Path) -> str:
    """The path relative to the repository when inside it (records stay machine-independent)."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def load_preset(path: Path) -> LlamaGenSpec:
    return make_spec(**yaml.safe_load(path.read_text()))


def load_tokenizer(spec: LlamaGenSpec, path: Path | None) -> VQTokenizer:
    if path is None:
        return spec.build_tokenizer()
    return load_weights(spec.build_tokenizer(load=False), path, kind="tokenizer", key="model")


@torch.no_grad()
def encode_split(tokenizer: VQTokenizer, data: FashionMNISTDataset, limit: int | None = None,
                 batch_size: int = 500) -> torch.Tensor:
    """Token ids (N, 64) int64 of a split (its first ``limit`` images), float32 encoder, as users encode."""
    ids, count = [], min(limit or len(data), len(data))
    for start in tqdm(range(0, count, batch_size), desc=f"encode {data.split}", mininterval=5.0):
        stop = min(start + batch_size, count)
        images = uint8_to_model_images(data.images[start:stop]).unsqueeze(1).expand(-1, 3, -1, -1)
        ids.append(tokenizer.encode(images.contiguous())[1])
    return torch.cat(ids)


def train(teacher: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
          loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss) -> dict:
    """The training loop on pre-encoded ids (N, T); ``loss_fn(teacher, labels, ids)`` is the family's objective
    (LlamaGen's next-token loss by default). Returns the loss curve and step count."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(decay_parameter_groups(teacher, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    start_time, step, curve, window = time.time(), 0, [], 0.0
    order, cursor = torch.randperm(len(ids), generator=generator), 0

    def progress() -> float:
        by_time = (time.time() - start_time) / args.time_budget if args.time_budget else 0.0
        return max(step / args.steps, by_time)

    bar = tqdm(total=args.steps, desc="teacher", mininterval=5.0, disable=None)
    teacher.train()
    while progress() < 1.0:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(ids), generator=generator), 0
        index = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine_factor(progress(), args.warmup, final_ratio=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = loss_fn(teacher, labels[index], ids[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        step += 1
        window += float(loss.detach())
        if step % LOG_EVERY == 0:
            curve.append({"step": step, "lr": optimizer.param_groups[0]["lr"], "loss": round(window / LOG_EVERY, 5)})
            bar.set_postfix(loss=f"{window / LOG_EVERY:.4f}")
            window = 0.0
        bar.update(1)
    bar.close()
    return {"steps": step, "sequences_seen": step * args.batch_size,
            "epochs": round(step * args.batch_size / len(ids), 3), "curve": curve,
            "train_seconds": round(time.time() - start_time, 1)}


@torch.no_grad()
def test_cross_entropy(teacher: LlamaGenGPT, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean next-token cross-entropy (nats per token) in eval mode (no label dropout), float32."""
    teacher.eval()
    total = 0.0
    for start in range(0, len(ids), batch_size):
        chunk = slice(start, start + batch_size)
        total += float(next_token_loss(teacher, labels[chunk], ids[chunk])) * len(ids[chunk])
    return total / len(ids)


@torch.no_grad()
def sample(teacher: LlamaGenGPT, tokenizer: VQTokenizer, labels: torch.Tensor, seeds: list[int],
           cfg_scale: float) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] (clamped) for class labels (B,), per-sample seeded token draws."""
    chooser = SeededMultinomialChooser(per_sample_uniform(seeds, GRID[0] * GRID[1]))
    result = generate(teacher, labels, GRID[0] * GRID[1], SamplingConfig(cfg_scale=cfg_scale), chooser)
    images = [tokenizer.decode_indices(chunk, GRID) for chunk in result.tokens.split(250)]
    return torch.cat(images).clamp(-1, 1)


@torch.no_grad()
def sample_metrics(samples: torch.Tensor, labels: torch.Tensor, test_data: FashionMNISTDataset) -> dict:
    """Classifier accuracy and proxy FID (classifier features) of samples vs the test split, plus the FID of as many
    real test images (the small-sample floor)."""
    classifier = load_fmnist_classifier()
    samples_uint8 = model_images_to_uint8(samples)
    accuracy = float((predict_labels(samples_uint8, classifier) == labels).float().mean())
    reference = load_reference_stats(asset_path(TEST_STATS_FILENAME))

    def fid(images_uint8: torch.Tensor) -> float:
        features = torch.cat([classifier.features(chunk) for chunk in images_uint8.split(500)])
        return frechet_distance(compute_stats(features), reference)

    real = test_data.images[: len(samples)].unsqueeze(1).expand(-1, 3, -1, -1)
    return {"sample_count": len(samples), "sample_classifier_accuracy": accuracy,
            "sample_proxy_fid": fid(samples_uint8), "real_test_proxy_fid_same_count": fid(real)}


def evaluate(teacher: LlamaGenGPT, tokenizer: VQTokenizer, test_ids: torch.Tensor, test_data: FashionMNISTDataset,
             args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Test cross-entropy (conditional and with the null class) and sample metrics; returns (metrics, samples
    (N, 3, 32, 32) in [-1, 1], their labels (N,))."""
    eval_start = time.time()
    test_labels = test_data.labels[: len(test_ids)]
    test_ce = test_cross_entropy(teacher, test_ids, test_labels)
    test_ce_uncond = test_cross_entropy(teacher, test_ids, torch.full_like(test_labels, teacher.null_class))
    labels = torch.arange(teacher.num_classes).repeat_interleave(args.samples_per_class)
    samples = sample(teacher, tokenizer, labels, list(range(len(labels))), args.cfg_scale)
    metrics = {"test_sequences": len(test_ids), "test_cross_entropy": test_ce, "test_perplexity": math.exp(test_ce),
               "test_cross_entropy_unconditional": test_ce_uncond,
               "uniform_cross_entropy": math.log(teacher.vocab_size),
               **sample_metrics(samples, labels, test_data), "sample_cfg_scale": args.cfg_scale,
               "eval_seconds": round(time.time() - eval_start, 1)}
    return metrics, samples, labels


def save_sample_grid(samples: torch.Tensor, labels: torch.Tensor, per_class: int, path: Path) -> None:
    """One row per class with the first ``per_class`` samples of that class; [-1, 1] -> [0, 1]."""
    rows = [samples[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_class, padding=2, pad_value=0.5)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = load_preset(args.preset)
    tokenizer = load_tokenizer(spec, args.tokenizer)
    train_data, test_data = FashionMNISTDataset("train"), FashionMNISTDataset("test")
    encode_start = time.time()
    train_ids = encode_split(tokenizer, train_data, args.limit_images)
    test_ids = encode_split(tokenizer, test_data, args.limit_images)
    encode_seconds = round(time.time() - encode_start, 1)

    teacher = spec.build_teacher(load=False)
    stats = train(teacher, train_ids, train_data.labels[: len(train_ids)], args)
    save_fp16_checkpoint(teacher, args.out)
    reloaded = load_weights(spec.build_teacher(load=False), args.out, kind="teacher", key="model")
    metrics, samples, labels = evaluate(reloaded, tokenizer, test_ids, test_data, args)
    save_sample_grid(samples, labels, args.grid_per_class, args.image)
    settings = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"date": datetime.date.today().isoformat(), "torch_version": str(torch.__version__),
              "dataset": "Fashion-MNIST train tokens (60,000 x 64); metrics on the test split's tokens",
              "weights": args.out.name, "weights_bytes": args.out.stat().st_size, "settings": settings,
              "encode_seconds": encode_seconds, **stats,
              "final_train": stats["curve"][-1] if stats["curve"] else None, **metrics}
    record_path = update_training_record(args.record or args.out.with_name("llamagen_tiny_record.json"),
                                         "teacher", record)
    print(f"steps {stats['steps']} in {stats['train_seconds']} s; test CE {metrics['test_cross_entropy']:.4f} nats "
          f"(ppl {metrics['test_perplexity']:.2f}; unconditional {metrics['test_cross_entropy_unconditional']:.4f}); "
          f"sample accuracy "
          f"{metrics['sample_classifier_accuracy']:.3f}, proxy FID {metrics['sample_proxy_fid']:.2f} "
          f"(real floor {metrics['real_test_proxy_fid_same_count']:.2f}); wrote {args.out}, {record_path}, "
          f"{args.image}")


if __name__ == "__main__":
    main()
