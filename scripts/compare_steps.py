"""Does the second student step help? 1-step vs t_list sampling of one student on held-out pairs, side by side.

    python -m dd.generate_pairs model=var_tiny num_pairs=2000 seed_base=1000000 output_dir=outputs/heldout/var_tiny
    python scripts/compare_steps.py --model var_tiny --student outputs/train/var_tiny/export/student_ema.pt \\
        --pairs outputs/heldout/var_tiny/pairs [--t-list 0 4] [--split 6] [--json out.json]

Use pairs the student never trained on (another ``seed_base``). Prints, for the tokens after t2: accuracy from noise
alone vs with the true prefix given, sampled 1-step vs t_list accuracy against the pairs, and the teacher's NLL of
each sampler's tokens given its own prefix, each with a paired z (dd/evaluation/step_comparison.py says why both).
Any family: the preset's ``default_t_list`` / ``default_split_t`` unless given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from demo import _cfg  # noqa: E402  (the demo's Hydra composition helper)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="preset name (configs/model/<name>.yaml)")
    parser.add_argument("--student", required=True, help="DD student export (.pt) of that preset")
    parser.add_argument("--pairs", required=True, help="held-out pairs folder (dd.generate_pairs' <out>/pairs)")
    parser.add_argument("--t-list", type=int, nargs="+", default=None, help="default: the preset's default_t_list")
    parser.add_argument("--split", type=int, default=None, help="default: the preset's default_split_t")
    parser.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dd.checkpoint import CheckpointError
    from dd.pairs import PairFormatError

    try:
        return _run(args)
    except (ValueError, PairFormatError, CheckpointError, FileNotFoundError) as error:  # bad input: one line
        parser.error(str(error))


def _run(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate

    from dd.evaluation.step_comparison import compare_steps
    from dd.pairs import PairDataset, PairExpectation

    spec = instantiate(_cfg("eval", [f"model={args.model}"])["model"])
    family = spec.build_family()
    student = spec.build_student(family.codebook(), init="checkpoint", checkpoint=args.student).eval()
    pairs = PairDataset(Path(args.pairs), PairExpectation.of_family(family))
    count = len(pairs) if args.limit is None else min(args.limit, len(pairs))
    items = [pairs[i] for i in range(count)]
    labels, noise, ids = (torch.stack([item[key] for item in items]) for key in ("label", "noise", "indices"))
    t_list = args.t_list or list(spec.default_t_list)
    split = spec.default_split_t if args.split is None else args.split
    result = compare_steps(student, family, spec.sampling, labels, noise, ids.long(), t_list, split)
    r = result.as_dict()
    print(f"{count} held-out pairs, t_list {t_list}, split {split}; tokens after t2 = {r['t2']} (from position "
          f"{r['rest_start']} of {family.sequence_length})")
    print("| measure | 1 step / noise only | 2 steps / prefix given | paired z |\n|---|---|---|---|")
    print(f"| token accuracy, true prefix given vs noise alone | {r['acc_noise']:.4f} | {r['acc_given']:.4f} | "
          f"{r['z_given']:.2f} |")
    print(f"| sampled token accuracy vs the pairs | {r['acc_1step']:.4f} | {r['acc_2step']:.4f} | {r['z_tokens']:.2f} |")
    print(f"| teacher NLL given own prefix (nats/token; pairs' own {r['nll_pairs']:.4f}) | {r['nll_1step']:.4f} | "
          f"{r['nll_2step']:.4f} | {r['z_nll']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
