"""Dense vs support-restricted flow-map solve (``FlowMapConfig.support``): where the restriction pays.

Times one ``map_noise_to_tokens`` call (default solver, 100 steps) over ``rows`` tokens whose distributions are top-k
truncated to ``fraction x V`` codes, with ``support="dense"`` and ``support="compact"`` interleaved, min of
``--repeats``; random codebooks of both families' shapes (8-d l2-normalised, V = 16384, like LlamaGen; 32-d raw,
V = 4096, like VAR). Also checks that both give the same tokens. The restricted solve takes the gathered form for
codebooks of <= ``GATHER_MAX_DIM`` dimensions (the 8-d rows) and the shared form otherwise; ``AUTO_SUPPORT_FRACTION``
(shared) and ``AUTO_SUPPORT_FRACTION_GATHERED`` were chosen from this table.

    python scripts/bench_flow_support.py --threads 1
    python scripts/bench_flow_support.py --shapes 16384x8:8,4096x32:1024 --fractions 0.1,0.25,0.5 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dd.flow import FlowMapConfig, map_noise_to_tokens


def make_case(vocab: int, dim: int, rows: int, keep: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(vocab, dim, generator=g)
    codebook = codebook / codebook.norm(dim=1, keepdim=True) if dim <= 8 else 0.5 * codebook
    logits = 2.0 * torch.randn(rows, vocab, generator=g)
    kth = torch.topk(logits, keep, dim=1).values[:, -1:]
    log_probs = torch.log_softmax(logits.masked_fill(logits < kth, -math.inf), dim=1)
    return torch.randn(rows, dim, generator=g), log_probs, codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16384x8:8,16384x8:256,4096x32:64,4096x32:1024",
                        help="VxD:rows entries, comma-separated")
    parser.add_argument("--fractions", default="0.1,0.2,0.25,0.3,0.4,0.5", help="support sizes as fractions of V")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"dpmpp_2m, {args.steps} steps, CPU, torch threads {torch.get_num_threads()}, min of {args.repeats}\n")
    print("| V x d | rows | support / V | dense ms | restricted ms | restricted / dense | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        size, rows = shape.split(":")
        vocab, dim = (int(v) for v in size.split("x"))
        for fraction in (float(f) for f in args.fractions.split(",")):
            noise, log_probs, codebook = make_case(vocab, dim, int(rows), max(1, int(fraction * vocab)))
            times: dict[str, list[float]] = {"dense": [], "compact": []}
            results = {}
            for _ in range(args.repeats):
                for support in times:
                    config = FlowMapConfig(num_steps=args.steps, support=support)
                    start = time.perf_counter()
                    results[support] = map_noise_to_tokens(noise, log_probs, codebook, config)
                    times[support].append(time.perf_counter() - start)
            dense, compact = (1e3 * min(times[s]) for s in ("dense", "compact"))
            same = bool(torch.equal(results["dense"].indices, results["compact"].indices))
            print(f"| {vocab} x {dim} | {rows} | {fraction:.2f} | {dense:.1f} | {compact:.1f} | "
                  f"{compact / dense:.2f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
