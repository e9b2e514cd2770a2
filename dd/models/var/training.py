"""Training objective of the VAR teacher (pure torch): teacher-forced next-scale cross-entropy.

Used by ``scripts/train_tiny_var_teacher.py`` to train the bundled tiny preset. As upstream VAR's trainer: the input
is the teacher-forcing sequence built from the ground-truth token maps by the VQVAE
(``indices_to_var_input``: the area-downsampled cumulative f_hat of the previous scales), the logits at the slots
of scale s predict the ids of scale s, and every token of every scale is a target (mean over all L tokens). In
training mode the teacher drops labels to the null class with ``cond_drop_rate`` (classifier-free guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE, flat_to_scales


def next_scale_loss(teacher: VARTransformer, vqvae: MultiScaleVQVAE, labels: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) on flat ids (B, L) in scale order, labels (B,)."""
    with torch.no_grad():
        inputs = vqvae.indices_to_var_input(flat_to_scales(ids, teacher.patch_nums))
    logits = teacher(labels, inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))
