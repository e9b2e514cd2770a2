"""LlamaGen Distilled-Decoding student (official ``autoregressive/models/dd.py``, ``DDTransformer``).

The student reads a sequence X_t of L continuous d-dimensional tokens (d = codebook dim, 8 for VQ-16): the first
t are data (codebook rows), the rest Gaussian noise. Slot 0 holds the class embedding, slot j >= 1 token j - 1.
Output position i (class slot dropped) predicts the *final* token i from the slot holding token i's own input.
Parameter names match the official ``LlamaGen-DD/llamagen-*.pt["ema"]`` state dicts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dd.acceleration import FastForward
from dd.checkpoint import load_entries
from dd.models.codebook import nearest_code_indices
from dd.models.continuous_head import ContinuousHead
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.layers import LabelEmbedder, RMSNorm, TransformerBlock, rope_table_2d, swiglu_hidden_dim


class LlamaGenDDStudent(FastForward, nn.Module):
    """DD student: teacher trunk + continuous input projection + noise/data embedding + two heads.

    ``codebook`` (V, d) is the tokenizer's l2-normalised codebook; it is a non-persistent buffer (not in the
    official state dict) used to snap logits-head predictions and given inputs to codebook rows.
    ``set_fast_path`` (:class:`~dd.acceleration.FastForward`) compiles or CUDA-graphs the forward that
    :meth:`final_predict` runs (the samplers' only call), optionally under an autocast dtype.
    """

    def __init__(self, *, dim: int, n_layer: int, n_head: int, vocab_size: int, num_classes: int, block_size: int,
                 codebook_dim: int, n_kv_head: int | None = None, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 codebook: torch.Tensor | None = None, **_ignored_teacher_args: object) -> None:
        super().__init__()
        grid = math.isqrt(block_size)
        if grid * grid != block_size:
            raise ValueError(f"block_size={block_size} must be a square number (grid_size**2)")
        self.dim, self.n_layer, self.n_head = dim, n_layer, n_head
        self.vocab_size, self.num_classes, self.block_size = vocab_size, num_classes, block_size
        self.codebook_dim, self.grid_size = codebook_dim, grid
        self.tok_embeddings = nn.Linear(codebook_dim, dim, bias=True)
        self.cls_embedding = LabelEmbedder(num_classes, dim, with_null_row=True)
        self.n_d_embed = nn.Embedding(2, dim)
        hidden = swiglu_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        kv = n_kv_head or n_head
        self.layers = nn.ModuleList(
            TransformerBlock(dim=dim, n_head=n_head, n_kv_head=kv, ffn_hidden=hidden, norm_eps=norm_eps)
            for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.final_layer_conti = ContinuousHead(dim, codebook_dim)
        self.register_buffer("rope", rope_table_2d(grid, dim // n_head, rope_base, 1), persistent=False)
        initial = codebook if codebook is not None else torch.zeros(vocab_size, codebook_dim)
        self.register_buffer("codebook", initial.detach().clone().float(), persistent=False)

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Install the tokenizer codebook (V, d) used for snapping."""
        if tuple(codebook.shape) != (self.vocab_size, self.codebook_dim):
            raise ValueError(f"codebook shape {tuple(codebook.shape)} != ({self.vocab_size}, {self.codebook_dim})")
        self.codebook.copy_(codebook.detach().to(self.codebook))

    @property
    def sequence_length(self) -> int:
        return self.block_size

    def num_data_tokens(self, t: torch.Tensor | int) -> torch.Tensor:
        """Timesteps -> number of leading data tokens (one token per timestep)."""
        return torch.as_tensor(t).long()

    @staticmethod
    def data_mask(t: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L) bool, True at positions i < t (given data tokens); t (B,) counts leading data tokens."""
        positions = torch.arange(length, device=t.device)
        return positions[None, :] < t.to(torch.float64)[:, None]

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d) continuous tokens, labels (B,), t (B,) -> (tokens (B, L, d), logits (B, L, V) float32).

        n_d embedding index 1 ("data") at slots j <= t (class slot + t data tokens), 0 elsewhere.
        """
        batch, length, _ = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)
        class_emb = self.cls_embedding(labels)
        h = torch.cat([class_emb[:, None, :], self.tok_embeddings(x)], dim=1)
        slots = torch.arange(length + 1, device=x.device)
        is_data = (slots[None, :] <= t.to(torch.float64)[:, None]).long()
        h = h + self.n_d_embed(is_data)
        rope = self.rope[: length + 1]
        for layer in self.layers:
            h = layer(h, rope)
        logits = self.output(self.norm(h)).float()[:, 1:]
        tokens = self.final_layer_conti(h, class_emb)[:, 1:]
        return tokens, logits

    def _fast_target(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The capture-safe trunk of the fast paths: :meth:`forward` itself (t a device tensor: no host reads)."""
        return self(x, labels, t)

    # -- official inference helpers ----------------------------------------------------------------------------
    def nearest_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L) nearest (squared L2) codebook row of every token."""
        return nearest_code_indices(x, self.codebook)

    def perturb(self, data: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """X_t: positions < t keep ``data``, positions >= t take ``noise`` (the official ``perturb_data``)."""
        t = torch.as_tensor(t, device=data.device).reshape(-1).expand(data.shape[0])
        keep = self.data_mask(t, data.shape[1])[..., None]
        return torch.where(keep, data, noise)

    def final_predict(self, x_t: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | int,
                      given_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, then keep the given positions: tokens = input, logits = one-hot log-distribution at the given
        position's codebook index (``given_idx``, default: nearest row of the input). Shapes as ``forward``."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        tokens, logits = self.fast_call(x_t, labels, t)
        if given_idx is None:
            given_idx = self.nearest_indices(x_t)
        given = self.data_mask(t, x_t.shape[1])
        one_hot = torch.full_like(logits, float("-inf")).scatter_(-1, given_idx[..., None], 0.0)
        logits = torch.where(given[..., None], one_hot, logits)
        tokens = torch.where(given[..., None], x_t, tokens)
        return tokens, logits

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L, V) -> (B, L, d): codebook rows of the argmax."""
        return self.codebook[logits.argmax(dim=-1)]

    def final_sequence(self, tokens: torch.Tensor, logits: torch.Tensor, split: int) -> torch.Tensor:
        """Official ``get_final_x_BLC``: positions < split from the greedy logits, the rest continuous tokens."""
        use_logits = (torch.arange(tokens.shape[1], device=tokens.device) < split)[None, :, None]
        return torch.where(use_logits, self.greedy_tokens(logits), tokens)

    # -- training utility --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_teacher(self, teacher: LlamaGenGPT) -> None:
        """Copy class table, transformer blocks, final norm and output head from a teacher of the same shape.

        ``tok_embeddings``, ``n_d_embed`` and ``final_layer_conti`` keep their own initialisation. A teacher without
        a null class row (class_dropout_prob = 0) fills the rows it has.
        """
        load_entries(self, self.weights_from_teacher(teacher.state_dict()), what="DD student (from its teacher)")

    @torch.no_grad()
    def weights_from_teacher(self, teacher_state: dict[str, torch.Tensor], head: bool = True
                             ) -> dict[str, torch.Tensor]:
        """The entries of this student's state dict that :meth:`init_from_teacher` takes from a teacher, built from
        a teacher's state dict (or one with the teacher's names that lacks ``output``, as DD2's feature trunk:
        ``head=False`` leaves the output head out). The class table keeps this student's rows past the source's."""
        table = "cls_embedding.embedding_table.weight"
        rows = self.state_dict()[table].clone()
        rows[: teacher_state[table].shape[0]] = teacher_state[table]
        parts = ("layers.", "norm.", "output.") if head else ("layers.", "norm.")
        weights = {name: teacher_state[name] for name in self.state_dict() if name.startswith(parts)}
        return {table: rows, **weights}


def reset_student_new_parameters(student: LlamaGenDDStudent, std: float = 0.02) -> None:
    """The official initialisation of the parts a teacher does not provide: N(0, std) weights, zero biases."""
    with torch.no_grad():
        nn.init.normal_(student.tok_embeddings.weight, std=std)
        nn.init.zeros_(student.tok_embeddings.bias)
        nn.init.normal_(student.n_d_embed.weight, std=std)
        student.final_layer_conti.reset_parameters(std)
