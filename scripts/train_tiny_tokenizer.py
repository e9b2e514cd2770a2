"""Train the bundled tiny LlamaGen VQ tokenizer (preset ``configs/model/gpt_tiny.yaml``) on Fashion-MNIST.

Objective: ``dd.models.llamagen.training.tokenizer_loss`` (l2-normalised codebook, codebook + 0.25 * commitment loss,
straight-through estimator, pixel MSE; no GAN or perceptual loss) with dead-code restarts during the first
``--restart-until`` of training. AdamW with linear warm-up and cosine decay; bf16 autocast on CPU by default (the
quantiser runs in float32).

Writes (defaults):

* ``dd/assets/llamagen_tiny_vq.pt``: ``{'model': fp16 state dict}`` (the official LlamaGen layout);
* section ``tokenizer`` of ``dd/assets/llamagen_tiny_record.json``: settings, loss curve, test metrics, wall time;
* ``docs/img/tiny_tokenizer_recon.png``: test originals (odd rows) above their reconstructions (even rows).

Test metrics are measured on the fp16 weights reloaded into a float32 model, as users get them. Training is bounded
by ``--steps`` and, optionally, ``--time-budget`` seconds (the LR schedule follows whichever is further along, so a
time-bounded run still ends annealed). Usage::

    python scripts/train_tiny_tokenizer.py [--steps 2000] [--time-budget 600] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch
import yaml
from torchvision.utils import save_image
from tqdm import tqdm

from dd.data.fashion_mnist import FashionMNISTDataset
from dd.data.image_folder import uint8_to_model_images
from dd.models.llamagen import LlamaGenSpec, VQTokenizer, load_weights, make_spec
from dd.models.llamagen.training import (
    DeadCodeRestarter,
    codebook_usage,
    decay_parameter_groups,
    psnr_from_mse,
    save_fp16_checkpoint,
    tokenizer_loss,
    update_training_record,
    warmup_cosine_factor,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "configs" / "model" / "gpt_tiny.yaml"
LOG_EVERY = 50


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (loop only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of training")
    parser.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    parser.add_argument("--recon", choices=["l2", "l1", "l1+l2"], default="l2")
    parser.add_argument("--restart-window", type=int, default=50, help="steps between dead-code restarts")
    parser.add_argument("--restart-until", type=float, default=0.7, help="fraction of training with restarts")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--eval-images", type=int, default=10000, help="test images for the metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", type=Path, default=PRESET)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dd" / "assets" / "llamagen_tiny_vq.pt")
    parser.add_argument("--record", type=Path, default=None, help="default: llamagen_tiny_record.json next to --out")
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "docs" / "img" / "tiny_tokenizer_recon.png")
    return parser.parse_args()


def repo_relative(path: Path) -> str:
    """The path relative to the repository when inside it (records stay machine-independent)."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def load_preset(path: Path) -> LlamaGenSpec:
    return make_spec(**yaml.safe_load(path.read_text()))


def batch_images(dataset: FashionMNISTDataset, index: torch.Tensor) -> torch.Tensor:
    """Model images (B, 3, 32, 32) in [-1, 1] straight from the dataset's uint8 tensor (no per-item Python)."""
    return uint8_to_model_images(dataset.images[index]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


class Progress:
    """Training progress in [0, 1]: max(step / steps, elapsed / time_budget)."""

    def __init__(self, steps: int, time_budget: float | None) -> None:
        self.steps, self.time_budget, self.start = steps, time_budget, time.time()

    def __call__(self, step: int) -> float:
        by_time = (time.time() - self.start) / self.time_budget if self.time_budget else 0.0
        return max(step / self.steps, by_time)


def train(tokenizer: VQTokenizer, data: FashionMNISTDataset, args: argparse.Namespace) -> dict:
    """The training loop; returns the curve (one entry per LOG_EVERY steps) and restart statistics."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(decay_parameter_groups(tokenizer, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    restarter = DeadCodeRestarter(tokenizer.codebook_size, args.restart_window)
    progress, curve, restarted, step = Progress(args.steps, args.time_budget), [], 0, 0
    window: dict[str, float] = {"loss": 0.0, "reconstruction": 0.0, "codebook": 0.0, "commitment": 0.0}
    seen = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    order = torch.randperm(len(data), generator=generator)
    bar = tqdm(total=args.steps, desc="tokenizer", mininterval=5.0)
    tokenizer.train()
    while progress(step) < 1.0:
        start = (step * args.batch_size) % (len(order) - args.batch_size + 1)
        images = batch_images(data, order[start : start + args.batch_size])
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine_factor(progress(step), args.warmup, final_ratio=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            out = tokenizer_loss(tokenizer, images, beta=args.beta, reconstruction_kind=args.recon)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        step += 1
        restarter.observe(out.indices)
        seen[out.indices.unique()] = True
        if restarter.due and progress(step) < args.restart_until:
            restarted += restarter.restart(tokenizer.quantize, out.latents, generator)
        elif restarter.due:
            restarter.reset()
        for name in window:
            window[name] += float(getattr(out, name).detach())
        if step % LOG_EVERY == 0:
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                     **{k: round(v / LOG_EVERY, 5) for k, v in window.items()},
                     "usage": round(float(seen.float().mean()), 4)}
            curve.append(entry)
            bar.set_postfix(rec=f"{entry['reconstruction']:.4f}", usage=f"{entry['usage']:.2f}")
            window = dict.fromkeys(window, 0.0)
            seen.zero_()
        bar.update(1)
    bar.close()
    return {"steps": step, "images_seen": step * args.batch_size, "curve": curve, "codes_restarted": restarted,
            "train_seconds": round(time.time() - progress.start, 1)}


@torch.no_grad()
def evaluate(tokenizer: VQTokenizer, data: FashionMNISTDataset, count: int, batch_size: int = 250) -> dict:
    """Test reconstruction MSE / PSNR (pixels in [-1, 1]) and codebook usage of the test tokens, float32."""
    squared_error, ids = 0.0, []
    count = min(count, len(data))
    for start in tqdm(range(0, count, batch_size), desc="eval", mininterval=5.0):
        images = batch_images(data, torch.arange(start, min(start + batch_size, count)))
        quant, indices = tokenizer.encode(images)
        squared_error += float((tokenizer.decode(quant.contiguous()) - images).pow(2).mean(dim=(1, 2, 3)).sum())
        ids.append(indices)
    mse = squared_error / count
    all_ids = torch.cat(ids)
    histogram = torch.bincount(all_ids.reshape(-1), minlength=tokenizer.codebook_size).float()
    probs = histogram[histogram > 0] / histogram.sum()
    return {"test_images": count, "test_mse": mse, "test_psnr_db": psnr_from_mse(mse),
            "test_codebook_usage": codebook_usage(all_ids, tokenizer.codebook_size),
            "test_code_perplexity": float(torch.exp(-(probs * probs.log()).sum()))}


@torch.no_grad()
def save_reconstruction_grid(tokenizer: VQTokenizer, data: FashionMNISTDataset, path: Path, per_row: int = 16,
                             pairs: int = 4) -> None:
    """Rows alternate test originals / reconstructions, ``pairs`` pairs of ``per_row`` images; [-1, 1] -> [0, 1]."""
    images = batch_images(data, torch.arange(per_row * pairs))
    recon = tokenizer(images).clamp(-1, 1)
    rows = [torch.cat([images[i * per_row : (i + 1) * per_row], recon[i * per_row : (i + 1) * per_row]])
            for i in range(pairs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_row, padding=2, pad_value=0.5)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = load_preset(args.preset)
    train_data, test_data = FashionMNISTDataset("train"), FashionMNISTDataset("test")
    tokenizer = spec.build_tokenizer(load=False)
    stats = train(tokenizer, train_data, args)
    save_fp16_checkpoint(tokenizer, args.out)
    reloaded = load_weights(spec.build_tokenizer(load=False), args.out, kind="tokenizer", key="model")
    eval_start = time.time()
    metrics = evaluate(reloaded, test_data, args.eval_images)
    metrics["eval_seconds"] = round(time.time() - eval_start, 1)
    save_reconstruction_grid(reloaded, test_data, args.image)
    settings = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"date": datetime.date.today().isoformat(), "torch_version": str(torch.__version__),
              "dataset": "Fashion-MNIST train (60,000), padded to 32x32 RGB; metrics on the test split",
              "weights": args.out.name, "weights_bytes": args.out.stat().st_size, "settings": settings,
              **stats, "final_train": stats["curve"][-1] if stats["curve"] else None, **metrics}
    record_path = update_training_record(args.record or args.out.with_name("llamagen_tiny_record.json"),
                                         "tokenizer", record)
    print(f"steps {stats['steps']} in {stats['train_seconds']} s; test MSE {metrics['test_mse']:.5f} "
          f"(PSNR {metrics['test_psnr_db']:.2f} dB), codebook usage {metrics['test_codebook_usage']:.3f}; "
          f"wrote {args.out} ({args.out.stat().st_size} bytes), {record_path}, {args.image}")


if __name__ == "__main__":
    main()
