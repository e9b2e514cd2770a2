"""VAR Distilled-Decoding student (official ``VAR/models/dd.py``, ``DD_Model``).

The student reads X_t as L continuous Cvae-dimensional tokens in flat scale order (the codebook rows of the first
t scales, Gaussian noise after them) and predicts the final token of every position in one pass. Against the
teacher it has one extra leading scale (slot 0 is a pure class / "sos" slot, slots 1..L hold the L tokens),
a noise/data embedding, a layer-wise noise/data embedding added between the two residual branches of every block
(and before the heads), a continuous head, and a mask under which a token sees all earlier scales and itself but not
the other tokens of its own scale. Parameter names match ``VAR-DD/var-d*.pth["trainer"]["ema_parameters"]``.

Timesteps t count leading data *scales* (0..num_scales); ``split`` of :meth:`final_sequence` is in scales too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dd.acceleration import FastForward
from dd.checkpoint import load_entries
from dd.models.codebook import nearest_code_indices
from dd.models.continuous_head import ContinuousHead
from dd.models.var.layers import scale_levels
from dd.models.var.transformer import VARTransformer


def dd_attention_bias(levels: torch.Tensor) -> torch.Tensor:
    """(1, 1, L, L): query q may attend key k iff level(q) >= level(k) + 1 or q == k; -inf elsewhere."""
    allowed = (levels[:, None] >= levels[None, :] + 1) | torch.eye(levels.numel(), dtype=torch.bool)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


class VARDDStudent(FastForward, VARTransformer):
    """The VAR DD student. ``patch_nums`` is the teacher's (base) list; the student prepends the sos scale itself.

    ``codebook`` (V, Cvae) is the VQVAE's Euclidean codebook, a non-persistent buffer used to snap predictions.
    ``set_fast_path`` (:class:`~dd.acceleration.FastForward`) compiles or CUDA-graphs :meth:`forward_given`, the
    trunk that :meth:`final_predict` runs, optionally under an autocast dtype.
    """

    def __init__(self, *, patch_nums: Sequence[int], codebook: torch.Tensor | None = None, **arch: object) -> None:
        self.base_patch_nums = tuple(int(p) for p in patch_nums)
        super().__init__(patch_nums=(1,) + self.base_patch_nums, **arch)
        c = self.embed_dim
        self.n_d_embed = nn.Embedding(2, c)
        self.layerwise_n_d_embed = nn.ModuleList(nn.Linear(c, c) for _ in range(self.depth + 1))
        self.final_layer_conti = ContinuousHead(c, self.z_channels)
        self.token_length = sum(pn * pn for pn in self.base_patch_nums)
        # data_counts[t] = tokens in the first t base scales (t = 0..num_base_scales)
        counts = [0]
        for pn in self.base_patch_nums:
            counts.append(counts[-1] + pn * pn)
        self.data_counts = tuple(counts)
        self.register_buffer("_data_counts", torch.tensor(counts, device="cpu"), persistent=False)
        initial = codebook if codebook is not None else torch.zeros(self.vocab_size, self.z_channels)
        self.register_buffer("codebook", initial.detach().clone().float(), persistent=False)

    def _levels(self) -> torch.Tensor:
        return scale_levels(self.patch_nums)

    def _attention_bias(self, levels: torch.Tensor) -> torch.Tensor:
        return dd_attention_bias(levels)

    # -- layout -----------------------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return len(self.base_patch_nums)

    @property
    def noise_mask(self) -> torch.Tensor:
        """(num_base_scales, L) float: row t is 1 at the noise positions of X_t (the official table)."""
        rows = [(torch.arange(self.token_length) >= self.data_counts[t]).float() for t in range(self.num_timesteps)]
        return torch.stack(rows)

    def set_codebook(self, codebook: torch.Tensor) -> None:
        if tuple(codebook.shape) != (self.vocab_size, self.z_channels):
            raise ValueError(f"codebook shape {tuple(codebook.shape)} != ({self.vocab_size}, {self.z_channels})")
        self.codebook.copy_(codebook.detach().to(self.codebook))

    def num_data_tokens(self, t: torch.Tensor | int) -> torch.Tensor:
        """Timesteps (scales) -> number of leading data tokens, elementwise (int64)."""
        t = torch.as_tensor(t, device=self._data_counts.device)
        if t.is_floating_point():
            t = t.int()  # the official code truncates float timesteps
        if bool(((t < 0) | (t > self.num_timesteps)).any()):
            raise ValueError(f"timesteps {t.tolist()} outside 0..{self.num_timesteps} (scales)")
        return self._data_counts[t.long()]

    def _given(self, t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        """(B, L) bool, True at the data positions of X_t."""
        counts = self.num_data_tokens(t).to(device).reshape(-1).expand(batch)
        return torch.arange(self.token_length, device=device)[None, :] < counts[:, None]

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, Cvae), labels (B,), t (B,) scales -> (tokens (B, L, Cvae), logits (B, L, V) float32).

        No label dropout (as the official DD forward)."""
        return self.forward_given(x, labels, self._given(t, x.shape[0], x.device))

    def forward_given(self, x: torch.Tensor, labels: torch.Tensor, given: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the data positions given as a (B, L) bool mask instead of timesteps: capture-safe
        (the timesteps are checked on the host in :meth:`_given`), the trunk of the fast paths."""
        batch = x.shape[0]
        cond = self.class_emb(labels)
        h = torch.cat([self.sos(cond), self.word_embed(x)], dim=1) + self.level_position(0, self.slots)
        data_slots = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=x.device), given], dim=1)
        n = self.n_d_embed(data_slots.long())
        h = h + n
        for block, between in zip(self.blocks, self.layerwise_n_d_embed):
            h = block(h, cond, self.attn_bias_for_masking, between=between(n))
        h = h + self.layerwise_n_d_embed[self.depth](n)
        logits = self.logits(h, cond)[:, 1:]
        tokens = self.final_layer_conti(h, cond)[:, 1:]
        return tokens, logits

    def _fast_target(self, x: torch.Tensor, labels: torch.Tensor, given: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_given(x, labels, given)

    # -- official inference helpers (behind the DDStudent protocol) ------------------------------------------------
    def nearest_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, Cvae) -> (B, L) nearest (Euclidean) codebook row of every token."""
        return nearest_code_indices(x, self.codebook)

    def perturb(self, data: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """X_t: the first t scales keep ``data``, later positions take ``noise`` (``perturb_data``)."""
        return torch.where(self._given(t, data.shape[0], data.device)[..., None], data, noise)

    def final_predict(self, x_t: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | int,
                      given_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, then keep the given positions: tokens = input, logits = one-hot log-distribution (0 / -inf) at
        the nearest codebook row of the input (or ``given_idx``)."""
        given = self._given(t, x_t.shape[0], x_t.device)
        tokens, logits = self.fast_call(x_t, labels, given)
        if given_idx is None:
            given_idx = self.nearest_indices(x_t)
        given = given[..., None]
        one_hot = torch.full_like(logits, float("-inf")).scatter_(-1, given_idx[..., None], 0.0)
        return torch.where(given, x_t, tokens), torch.where(given, one_hot, logits)

    def final_sequence(self, tokens: torch.Tensor, logits: torch.Tensor, split: int) -> torch.Tensor:
        """``get_final_sequence``: the first ``split`` scales from the greedy logits, the rest continuous tokens."""
        greedy = self.codebook[logits.argmax(dim=-1)].to(tokens.dtype)
        use_logits = self._given(split, tokens.shape[0], tokens.device)[..., None]
        return torch.where(use_logits, greedy, tokens)

    # -- training utility --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_teacher(self, teacher: VARTransformer) -> None:
        """The official ``init_with_teacher``: copy word/class embeddings, pos_start, blocks, head norm and head;
        level and position tables shift by one slot (student slot/level 1 is the new first token scale, freshly
        initialised). The official code re-initialises ``class_emb.weight[1]`` where ``lvl_embed.weight[1]`` was
        evidently meant; dd initialises ``lvl_embed.weight[1]`` (only training is affected). ``n_d_embed`` is
        re-initialised; the layer-wise embeddings start at zero so the initial student is the teacher's trunk."""
        load_entries(self, self.weights_from_teacher(teacher.state_dict()), what="DD student (from its teacher)")
        nn.init.trunc_normal_(self.lvl_embed.weight[1], std=self.init_std)
        nn.init.trunc_normal_(self.pos_1LC[0, 1], std=self.init_std)
        nn.init.trunc_normal_(self.n_d_embed.weight, std=self.init_std)
        for layer in self.layerwise_n_d_embed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def weights_from_teacher(self, teacher_state: dict[str, torch.Tensor], head: bool = True
                             ) -> dict[str, torch.Tensor]:
        """The entries of this student's state dict that :meth:`init_from_teacher` takes from a teacher, built from
        a teacher's state dict (or one with the teacher's names that lacks ``head``, as DD2's feature trunk:
        ``head=False`` leaves the logits head out). The level and position tables shift by one slot (the student's
        extra first scale): rows 0 and 2.. come from the source's 0 and 1.., row 1 stays this student's."""
        own = self.state_dict()
        parts = ("word_embed.", "class_emb.", "blocks.", "head_nm.") + (("head.",) if head else ())
        weights = {name: teacher_state[name] for name in own if name.startswith(parts)}
        weights["pos_start"] = teacher_state["pos_start"]
        for name, dim in (("lvl_embed.weight", 0), ("pos_1LC", 1)):
            table, source = own[name].clone(), teacher_state[name]
            table.narrow(dim, 0, 1).copy_(source.narrow(dim, 0, 1))
            table.narrow(dim, 2, table.shape[dim] - 2).copy_(source.narrow(dim, 1, source.shape[dim] - 1))
            weights[name] = table
        return weights

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """Initialise the parts a teacher does not provide (continuous head, noise/data embeddings)."""
        nn.init.trunc_normal_(self.n_d_embed.weight, std=self.init_std)
        for layer in self.layerwise_n_d_embed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.final_layer_conti.reset_parameters(self.init_std)
