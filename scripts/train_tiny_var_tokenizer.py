"""Train a tiny VAR multi-scale VQVAE (``dd.models.var.vqvae.MultiScaleVQVAE``) on Fashion-MNIST 32x32.

Architecture (the ``tokenizer.arch`` of ``configs/model/var_tiny.yaml``, the only size table): codebook 256 x 16, base width 32, ch_mult (1, 2, 2) (4x down-sampling: an 8x8 latent),
1 ResNet block per encoder level (2 per decoder level), attention at the lowest resolution and in the middle,
6 scales (1, 2, 3, 4, 6, 8) = 130 tokens, 4 shared Phi convs with quant_resi 0.5.

Objective: ``dd.models.var.vqvae_training.vqvae_loss`` (upstream ``VectorQuantizer2`` training forward: residual
multi-scale quantisation, straight-through estimator, beta * commitment + codebook loss on the cumulative f_hat
averaged over scales) plus pixel MSE; dead-code restarts on random per-scale query vectors during the first
``--restart-until`` of training. AdamW, linear warm-up and cosine decay; bf16 autocast on CPU by default (the quantiser
runs in float32). Batching, progress and path helpers come from ``train_tiny_tokenizer.py``.

Writes (defaults):

* ``dd/assets/var_tiny_vqvae.pt``: fp16 **raw** state dict (the official ``vae_ch160v4096z32.pth`` layout);
* section ``tokenizer`` of ``dd/assets/var_tiny_record.json``: settings, architecture, loss curve, test metrics.

Test metrics are measured on the fp16 weights reloaded into a float32 model. Usage::

    OMP_NUM_THREADS=1 python scripts/train_tiny_var_tokenizer.py [--steps 2000] [--time-budget 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from dd.checkpoint import extract_state_dict, load_strict, read_checkpoint, save_state_dict
from dd.data.fashion_mnist import FashionMNISTDataset
from dd.models.llamagen.training import (
    DeadCodeRestarter,
    codebook_usage,
    decay_parameter_groups,
    fp16_state_dict,
    psnr_from_mse,
    update_training_record,
    warmup_cosine_factor,
)
from dd.models.var.vqvae import MultiScaleVQVAE
from dd.models.var.vqvae_training import record_hits, scale_usages, vqvae_loss
from train_tiny_tokenizer import Progress, batch_images, repo_relative  # scripts/ is on sys.path when run

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 50
PRESET = REPO_ROOT / "configs" / "model" / "var_tiny.yaml"
TINY_ARCH: dict = yaml.safe_load(PRESET.read_text())["tokenizer"]["arch"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (loop only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of training")
    parser.add_argument("--beta", type=float, default=0.25, help="commitment loss weight (upstream 0.25)")
    parser.add_argument("--recon", choices=["l2", "l1", "l1+l2"], default="l2")
    parser.add_argument("--restart-window", type=int, default=50, help="steps between dead-code restarts")
    parser.add_argument("--restart-until", type=float, default=0.7, help="fraction of training with restarts")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--eval-images", type=int, default=10000, help="test images for the metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dd" / "assets" / "var_tiny_vqvae.pt")
    parser.add_argument("--record", type=Path, default=None, help="default: var_tiny_record.json next to --out")
    parser.add_argument("--image", type=Path, default=None, help="optional test reconstruction grid (png)")
    return parser.parse_args()


def build(test_mode: bool) -> MultiScaleVQVAE:
    return MultiScaleVQVAE(**TINY_ARCH, test_mode=test_mode)


def train(vae: MultiScaleVQVAE, data: FashionMNISTDataset, args: argparse.Namespace) -> dict:
    """The training loop; returns the curve (one entry per LOG_EVERY steps) and restart statistics."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(decay_parameter_groups(vae, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    restarter = DeadCodeRestarter(vae.vocab_size, args.restart_window)
    progress, curve, restarted, step = Progress(args.steps, args.time_budget), [], 0, 0
    window = dict.fromkeys(("loss", "reconstruction_loss", "vq", "commitment", "codebook"), 0.0)
    seen = torch.zeros(vae.vocab_size, dtype=torch.bool)
    order = torch.randperm(len(data), generator=generator)
    bar = tqdm(total=args.steps, desc="var tokenizer", mininterval=5.0)
    vae.train()
    while progress(step) < 1.0:
        start = (step * args.batch_size) % (len(order) - args.batch_size + 1)
        images = batch_images(data, order[start : start + args.batch_size])
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine_factor(progress(step), args.warmup, final_ratio=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            out = vqvae_loss(vae, images, beta=args.beta, reconstruction_kind=args.recon)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        step += 1
        record_hits(vae.quantize, out.quant.hits)
        restarter.observe(out.flat_indices)
        seen[out.flat_indices.unique()] = True
        if restarter.due and progress(step) < args.restart_until:
            restarted += restarter.restart(vae.quantize, out.quant.latents, generator)
        elif restarter.due:
            restarter.reset()
        for name in window:
            window[name] += float(getattr(out, name).detach())
        if step % LOG_EVERY == 0:
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                     **{k: round(v / LOG_EVERY, 5) for k, v in window.items()},
                     "usage": round(float(seen.float().mean()), 4)}
            curve.append(entry)
            bar.set_postfix(rec=f"{entry['reconstruction_loss']:.4f}", usage=f"{entry['usage']:.2f}")
            window = dict.fromkeys(window, 0.0)
            seen.zero_()
        bar.update(1)
    bar.close()
    positions = args.batch_size * vae.patch_nums[-1] ** 2
    return {"steps": step, "images_seen": step * args.batch_size, "curve": curve, "codes_restarted": restarted,
            "train_seconds": round(time.time() - progress.start, 1),
            "train_scale_usage_percent": [round(u, 2) for u in scale_usages(vae.quantize, positions)]}


@torch.no_grad()
def evaluate(vae: MultiScaleVQVAE, data: FashionMNISTDataset, count: int, batch_size: int = 250) -> dict:
    """Test reconstruction MSE / PSNR (pixels in [-1, 1], clamped decoder output as ``fhat_to_img``) and codebook
    usage of the test tokens (all scales together and per scale), float32."""
    squared_error, ids = 0.0, []
    count = min(count, len(data))
    for start in tqdm(range(0, count, batch_size), desc="eval", mininterval=5.0):
        images = batch_images(data, torch.arange(start, min(start + batch_size, count)))
        f = vae.encode_latent(images)
        per_scale = vae.f_to_indices(f)
        recon = vae.fhat_to_img(vae.f_to_fhat_per_scale(f)[-1])
        squared_error += float((recon - images).pow(2).mean(dim=(1, 2, 3)).sum())
        ids.append(torch.cat(per_scale, dim=1))
    mse = squared_error / count
    all_ids = torch.cat(ids)  # (count, L)
    histogram = torch.bincount(all_ids.reshape(-1), minlength=vae.vocab_size).float()
    probs = histogram[histogram > 0] / histogram.sum()
    per_scale_usage = [codebook_usage(all_ids[:, begin:end], vae.vocab_size) for begin, end in vae.scale_slices]
    return {"test_images": count, "test_mse": mse, "test_psnr_db": psnr_from_mse(mse),
            "test_codebook_usage": codebook_usage(all_ids, vae.vocab_size),
            "test_codebook_usage_per_scale": [round(u, 4) for u in per_scale_usage],
            "test_code_perplexity": float(torch.exp(-(probs * probs.log()).sum()))}


@torch.no_grad()
def save_reconstruction_grid(vae: MultiScaleVQVAE, data: FashionMNISTDataset, path: Path, per_row: int = 16,
                             pairs: int = 4) -> None:
    """Rows alternate test originals / reconstructions; [-1, 1] -> [0, 1]."""
    from torchvision.utils import save_image

    images = batch_images(data, torch.arange(per_row * pairs))
    recon = vae(images)
    rows = [torch.cat([images[i * per_row : (i + 1) * per_row], recon[i * per_row : (i + 1) * per_row]])
            for i in range(pairs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_row, padding=2, pad_value=0.5)


def reload(path: Path) -> MultiScaleVQVAE:
    """The saved fp16 raw state dict loaded strictly into a float32 model (how users get it)."""
    vae = build(test_mode=True)
    state = extract_state_dict(read_checkpoint(path), kind="tokenizer")
    load_strict(vae, vae.prepare_state_dict(state), what="tiny VAR VQVAE")
    return vae


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_data, test_data = FashionMNISTDataset("train"), FashionMNISTDataset("test")
    vae = build(test_mode=False)
    stats = train(vae, train_data, args)
    save_state_dict(fp16_state_dict(vae), args.out)  # raw state dict, as the official VQVAE file
    reloaded = reload(args.out)
    eval_start = time.time()
    metrics = evaluate(reloaded, test_data, args.eval_images)
    metrics["eval_seconds"] = round(time.time() - eval_start, 1)
    if args.image is not None:
        save_reconstruction_grid(reloaded, test_data, args.image)
    settings = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"date": datetime.date.today().isoformat(), "torch_version": str(torch.__version__),
              "dataset": "Fashion-MNIST train (60,000), padded to 32x32 RGB; metrics on the test split",
              "weights": args.out.name, "weights_bytes": args.out.stat().st_size, "arch": TINY_ARCH,
              "parameters": sum(p.numel() for p in reloaded.parameters()), "settings": settings,
              **stats, "final_train": stats["curve"][-1] if stats["curve"] else None, **metrics}
    record_path = update_training_record(args.record or args.out.with_name("var_tiny_record.json"), "tokenizer",
                                         record)
    print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "settings")}, indent=1))
    print(f"steps {stats['steps']} in {stats['train_seconds']} s; test MSE {metrics['test_mse']:.5f} "
          f"(PSNR {metrics['test_psnr_db']:.2f} dB), codebook usage {metrics['test_codebook_usage']:.3f}; "
          f"wrote {args.out} ({args.out.stat().st_size} bytes), {record_path}")


if __name__ == "__main__":
    main()
