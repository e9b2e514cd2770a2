"""How a one-step student's soft token relates to the code it samples (docs/dd2_study.md, eighth session).

DD2 matches distributions of the generator's *soft* token ``q = softmax(logits) @ codebook``, while ``dd.eval``
samples the *argmax* code. For each student export this prints, on the demo's labels and noise (balanced labels,
seed_base 100000):

* the codebook's geometry (row norms, nearest-neighbour distance; the noise of ``x_s = (1 - s) q + s eps`` has norm
  about ``s * sqrt(d)``),
* the mean softmax entropy and largest probability per token, the mean distance of q to its argmax code,
* how often the argmax code is also the code nearest to q,
* the teacher's NLL of the argmax sequence and of the nearest-code sequence (each under its own prefix),

and with ``--fid`` the demo's 1-step proxy FID / precision / recall twice: sampling the argmax (what ``dd.eval``
does) and the code nearest to q (this script swaps the student's ``final_sequence`` for that run only); with
``--drawn TAU`` (repeatable) also with every code drawn from ``softmax(logits / TAU)`` (seeded: the same draws on
every run; docs/dd2_study.md, tenth session).

    python scripts/soft_token_check.py outputs/dd2/gpt_tiny/<row>/train/export/student_ema.pt [more exports] [--fid]
    python scripts/soft_token_check.py <export> --fid --drawn 1.0 --drawn 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from demo import _cfg  # noqa: E402  (the demo's Hydra composition helper)


def _statistics(spec, family, export: str, samples: int) -> dict:
    import torch

    from dd.distill.dd2 import teacher_nll
    from dd.models.codebook import nearest_code_indices
    from dd.sampling.seeds import per_sample_labels, per_sample_normal

    codebook = family.codebook()
    student = spec.build_student(codebook, init="checkpoint", checkpoint=export).eval()
    seeds = list(range(100000, 100000 + samples))
    labels = per_sample_labels(seeds, spec.num_classes)
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim))
    with torch.no_grad():
        _, logits = student(noise, labels, torch.zeros(samples, dtype=torch.long))
        probs = torch.softmax(logits.float(), dim=-1)
        q = probs @ codebook.float()
        argmax, nearest = logits.argmax(-1), nearest_code_indices(q, codebook)
        nll = {name: teacher_nll(family.teacher_log_probs(labels, ids, spec.sampling), ids).item()
               for name, ids in (("argmax", argmax), ("nearest", nearest))}
    return {"entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().item(),
            "max_prob": probs.max(-1).values.mean().item(),
            "q_to_argmax_code": (q - codebook[argmax]).norm(dim=-1).mean().item(),
            "argmax_is_nearest": (argmax == nearest).float().mean().item(),
            "teacher_nll_argmax": nll["argmax"], "teacher_nll_nearest": nll["nearest"]}


def _fid(model: str, export: str, out: Path, mode: str, split: int, student_class: type,
         tau: float = 1.0) -> dict:
    """``mode``: argmax (dd.eval's own sampling), nearest (the code nearest to q) or drawn (codes drawn from
    softmax(logits / tau) with a generator seeded once per call: the evaluation's batches come in a fixed order)."""
    import torch

    from dd.eval import run as run_eval
    from dd.models.codebook import nearest_code_indices

    cfg = _cfg("eval", [f"model={model}", "num_samples=1000", "labels=balanced", "seed_base=100000",
                        "write_images=false", f"output_dir={out}", "resume=never", "sampler=fewstep",
                        "schedule.t_list=[0]", f"schedule.split_t={split}", f"student.checkpoint={export}"])
    original = student_class.final_sequence

    draws = torch.Generator().manual_seed(0)

    def nearest_to_soft_token(self, tokens, logits, split):
        q = torch.softmax(logits.float(), dim=-1) @ self.codebook
        return self.codebook[nearest_code_indices(q, self.codebook)]

    def drawn_from_softmax(self, tokens, logits, split):
        probs = torch.softmax(logits.float() / tau, dim=-1).cpu()
        ids = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=draws).reshape(probs.shape[:-1])
        return self.codebook[ids.to(self.codebook.device)]

    if mode != "argmax":
        student_class.final_sequence = nearest_to_soft_token if mode == "nearest" else drawn_from_softmax
    try:
        metrics = run_eval(cfg)["metrics"]
    finally:
        student_class.final_sequence = original
    return {k: round(float(metrics[k]), 4) for k in ("fid", "precision", "recall") if metrics.get(k) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="student exports (export/student_ema.pt of a dd.train run)")
    parser.add_argument("--model", default="gpt_tiny")
    parser.add_argument("--samples", type=int, default=256, help="sequences for the token statistics")
    parser.add_argument("--fid", action="store_true", help="also the 1-step proxy FID with argmax and nearest codes")
    parser.add_argument("--drawn", type=float, action="append", default=[], metavar="TAU",
                        help="with --fid: also the FID with the codes drawn from softmax(logits / TAU); repeatable")
    parser.add_argument("--out", default="outputs/soft_token_check", help="evaluation folders (--fid)")
    args = parser.parse_args()

    import torch
    from hydra.utils import instantiate

    spec = instantiate(_cfg("eval", [f"model={args.model}"])["model"], _convert_="all")
    family = spec.build_family()
    codebook = family.codebook().float()
    spacing = torch.cdist(codebook, codebook).fill_diagonal_(float("inf")).min(1).values
    print(json.dumps({"codebook": list(codebook.shape), "row_norm": round(codebook.norm(dim=1).mean().item(), 4),
                      "nearest_neighbour_distance": round(spacing.mean().item(), 4)}))
    student_class = type(spec.build_student(family.codebook(), init="random"))
    for index, export in enumerate(args.exports):
        row = {"export": export} | {k: round(v, 4) for k, v in _statistics(spec, family, export, args.samples).items()}
        if args.fid:
            modes = [("argmax", 1.0), ("nearest", 1.0)] + [("drawn", tau) for tau in args.drawn]
            for mode, tau in modes:
                name = f"drawn_tau{tau:g}" if mode == "drawn" else mode
                # split_t = the whole sequence: every token from the logits head, as the demo's 1-step row
                row[f"fid_{name}"] = _fid(args.model, export, Path(args.out) / f"{index}_{name}", mode,
                                          spec.num_timesteps, student_class, tau)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
