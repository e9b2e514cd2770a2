"""Exponential moving average of model weights, and export of a DD student in the official layout."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dd.checkpoint import save_state_dict


class EMA(nn.Module):
    """Keeps ``shadow`` = EMA of ``model``'s parameters (buffers copied).

    decay_t = min(decay, (1 + step) / (10 + step)) (warm-up so early averages are not dominated by the init).
    The shadow is a submodule, so it is saved in Lightning checkpoints and restored on resume.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        step = int(self.num_updates)
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.shadow.parameters(), model.parameters()):
            shadow.lerp_(live.detach().to(shadow.dtype), 1.0 - decay)
        for shadow, live in zip(self.shadow.buffers(), model.buffers()):
            shadow.copy_(live)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Set the shadow to ``model``'s current parameters and buffers (a new starting point: DD2's generator
        re-initialisation); ``num_updates`` and so the decay warm-up continue where they were."""
        for shadow, live in zip(self.shadow.parameters(), model.parameters()):
            shadow.copy_(live.detach())
        for shadow, live in zip(self.shadow.buffers(), model.buffers()):
            shadow.copy_(live)


def export_student(path: str | os.PathLike[str], ema_state: dict[str, torch.Tensor],
                   model_state: dict[str, torch.Tensor], config: dict[str, Any],
                   keys: tuple[str, str] = ("ema", "model")) -> Path:
    """Write the EMA and raw weights under the preset's ``export_keys`` (``('ema', 'model')``: the official
    LlamaGen-DD layout read by ``eval_fewstep.py --ema``; ``('trainer.ema_parameters', 'trainer.var_wo_ddp')``: the
    VAR-DD layout read by ``sample.py``) plus ``<path>.json`` with the plain config needed to rebuild the student."""
    clean = {k: v.detach().cpu().float().contiguous() for k, v in ema_state.items()}
    raw = {k: v.detach().cpu().float().contiguous() for k, v in model_state.items()}
    ema_key, raw_key = keys
    path = save_state_dict(clean, path, wrapper=ema_key, extra={raw_key: raw})
    Path(str(path) + ".json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return path
