"""DD2: conditional score distillation of an AR teacher into a one-step generator (method.md §7), pure torch.

DD2 (arXiv 2510.21003) publishes no code; what follows is dd's implementation of what the paper describes, with the
gaps filled as stated here and in the README ("DD2").

Noising (rectified flow, as the DD flow map): a token q in codebook space at noise level s in (0, 1) becomes
``x_s = (1 - s) q + s eps``. For AR position i the teacher's distribution p_i (given the earlier tokens) makes the
token a Dirac mixture over the codebook, so its denoiser and score are analytic (the flow map's posterior)::

    D_T(x, s) = E[q | x_s = x] = sum_k w_k c_k,   w = softmax_k(log p_ik - ||x - (1 - s) c_k||^2 / (2 s^2))
    score(x, s) = ((1 - s) D_T(x, s) - x) / s^2

Three networks:

* the *generator* G: the family's DD student at t = 0 (noise in, every token out in one forward). Its output token
  q_i is ``softmax(logits_i / tau) @ codebook`` (``output="logits"``: the sample is the argmax code, which is what
  ``dd.eval sampler=fewstep schedule=onestep`` takes when ``split_t`` covers the sequence) or the continuous head
  (``output="continuous"``: evaluate with ``schedule.split_t=0``).
* the *guidance* (fake score) network F: an "AR-diffusion" model, the teacher's trunk (features of position i from
  the tokens before it) with its logits head replaced by an MLP denoiser head ``F(features_i, x_s, s) -> q``.
* the teacher, frozen, through ``family.teacher_log_probs`` (its per-position sampling distribution given a prefix).

Losses (``s`` drawn per token, ``eps`` fresh Gaussian noise):

* GTS (initialisation of F): regress the analytic teacher denoiser, ``||F(x_s, s | q_<i) - D_T(x_s, s)||^2``;
* fake score matching: ``||F(x_s, s | sg(q)_<i) - sg(q_i)||^2`` on the generator's own tokens;
* generator (conditional score distillation, DMD-style gradient form): the gradient w.r.t. q_i is
  ``w (F(x_s) - D_T(x_s))`` (fake minus teacher denoiser at the noised generated token, prefix stop-gradient), i.e.
  ``0.5 ||q - sg(q - w (F - D_T))||^2`` summed over positions; w normalises by the mean |q - D_T| per sample
  (``normalize=True``). It vanishes exactly when F equals the teacher's denoiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


# -- analytic teacher denoiser / score ------------------------------------------------------------------------------
def analytic_denoiser(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor, codebook: torch.Tensor,
                      chunk_size: int = 2048) -> torch.Tensor:
    """E[q | x_s = x] under the Dirac mixture sum_k p_k delta(c_k), per row. x (N, d), s (N,) in (0, 1],
    log_probs (N, V) (-inf: excluded codes), codebook (V, d) -> (N, d) float32. No gradient flows to log_probs'
    producer unless the caller enables it; memory ~ chunk_size * V floats."""
    if x.dim() != 2 or log_probs.dim() != 2 or s.dim() != 1:
        raise ValueError(f"expected x (N, d), s (N,), log_probs (N, V); got {tuple(x.shape)}, {tuple(s.shape)}, "
                         f"{tuple(log_probs.shape)}")
    c = codebook.float()
    sq = (c * c).sum(1)
    out = []
    for i in range(0, x.shape[0], chunk_size):
        xs, ss, lp = x[i:i + chunk_size].float(), s[i:i + chunk_size].float(), log_probs[i:i + chunk_size].float()
        a = (1.0 - ss)[:, None]
        inv = 1.0 / (ss * ss)[:, None]
        logits = lp + (a * (xs @ c.t()) - 0.5 * a * a * sq[None, :]) * inv
        out.append(torch.softmax(logits, dim=1) @ c)
    return torch.cat(out) if out else x.new_zeros(x.shape, dtype=torch.float32)


def score_from_denoiser(x: torch.Tensor, s: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """grad_x log p_s(x) = ((1 - s) D(x, s) - x) / s^2 for the rectified-flow path; s broadcast over the last dim."""
    s = s[..., None]
    return ((1.0 - s) * denoised - x) / (s * s)


def mixture_log_density(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor,
                        codebook: torch.Tensor) -> torch.Tensor:
    """log p_s(x) of x_s = (1 - s) q + s eps, q ~ sum_k p_k delta(c_k) (N,), for checks of the score."""
    d = x.shape[-1]
    diff = x[:, None, :] - (1.0 - s)[:, None, None] * codebook[None]
    log_gauss = -0.5 * diff.pow(2).sum(-1) / (s * s)[:, None] - d * torch.log(s)[:, None] - 0.5 * d * math.log(2 * math.pi)
    return torch.logsumexp(log_probs + log_gauss, dim=1)


def noised(q: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) q + s eps; q, eps (..., d), s (...)."""
    s = s[..., None].to(q.dtype)
    return (1.0 - s) * q + s * eps


def sample_noise_levels(shape: tuple[int, ...], s_min: float, s_max: float, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Noise levels uniform in [s_min, s_max] (float32)."""
    if not 0.0 < s_min <= s_max <= 1.0:
        raise ValueError(f"noise levels need 0 < s_min <= s_max <= 1, got {s_min}, {s_max}")
    u = torch.rand(shape, generator=generator)
    return (s_min + (s_max - s_min) * u).to(device)


# -- the guidance (fake score) network ------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """Sinusoidal features of the noise level s in (0, 1)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), half)), persistent=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        angles = s[..., None].float() * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DenoiseHead(nn.Module):
    """MLP denoiser of one token: (features (.., C), x_s (.., d), s (..)) -> predicted clean token (.., d).

    x_s is divided by its expected scale sqrt((1-s)^2 token_var + s^2) (token_var: the codebook's mean squared
    entry) so every noise level feeds unit-size inputs; the head predicts the clean token directly."""

    def __init__(self, feature_dim: int, token_dim: int, width: int = 256, depth: int = 3,
                 time_dim: int = 64, token_var: float = 1.0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"head depth={depth} must be >= 1")
        self.token_var = float(token_var)
        self.time = TimeEmbedding(time_dim)
        layers: list[nn.Module] = [nn.Linear(feature_dim + token_dim + time_dim, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, token_dim)

    def forward(self, features: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((1.0 - s) ** 2 * self.token_var + s * s)[..., None]
        h = torch.cat([features.float(), x.float() / scale, self.time(s)], dim=-1)
        return self.out(self.mlp(h))


class ARDenoiser(nn.Module):
    """The AR-diffusion model: a feature trunk (``family.feature_trunk()``: features of position i from labels and
    the ids before it) and a :class:`DenoiseHead`. ``forward(labels, ids, x_s, s)`` denoises every position at once:
    ids (B, L) is the (snapped) sequence whose prefixes condition the positions, x_s (B, L, d), s (B, L)."""

    def __init__(self, trunk: nn.Module, token_dim: int, width: int = 256, depth: int = 3,
                 token_var: float = 1.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = DenoiseHead(int(trunk.feature_dim), token_dim, width, depth, token_var=token_var)

    def features(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.trunk(labels, ids)

    def forward(self, labels: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            features = self.features(labels, ids)
        return self.head(features, x, s)


# -- generator output -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorSample:
    """q (B, L, d): differentiable tokens; ids (B, L): their codes (the sample dd.eval produces); tokens and logits:
    the student's two heads (for the optional regression term)."""

    q: torch.Tensor
    ids: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor


def generator_sample(student: nn.Module, labels: torch.Tensor, noise: torch.Tensor, output: str = "logits",
                     temperature: float = 1.0) -> GeneratorSample:
    """One forward of the DD student at t = 0 -> generated tokens (see the module docstring for ``output``)."""
    t = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    tokens, logits = student(noise, labels, t)
    codebook = student.codebook
    if output == "logits":
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return GeneratorSample(probs @ codebook.float(), logits.argmax(-1), tokens, logits)
    if output == "continuous":
        return GeneratorSample(tokens.float(), student.nearest_indices(tokens.detach()), tokens, logits)
    raise ValueError(f"dd2 generator output={output!r}: expected 'logits' or 'continuous'")


# -- losses ---------------------------------------------------------------------------------------------------------
def gts_loss(fake: ARDenoiser, labels: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, log_probs: torch.Tensor,
             codebook: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Regression of the analytic teacher denoiser at x_s = noised(q): mean over tokens of the squared error."""
    x = noised(q.detach().float(), s, eps)
    with torch.no_grad():
        target = teacher_denoised_at(x, s, log_probs, codebook)
    return (fake(labels, ids, x, s) - target).pow(2).sum(-1).mean()


def fake_score_loss(fake: ARDenoiser, labels: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching on the generator's (detached) tokens, conditioned on their snapped prefixes."""
    q = q.detach().float()
    return (fake(labels, ids, noised(q, s, eps), s) - q).pow(2).sum(-1).mean()


@dataclass(frozen=True)
class GeneratorLoss:
    loss: torch.Tensor
    grad_norm: torch.Tensor  # mean per-token norm of w (F - D_T): the distillation signal's size (detached)


def generator_loss(q: torch.Tensor, teacher_denoised: torch.Tensor, fake_denoised: torch.Tensor,
                   normalize: bool = True) -> GeneratorLoss:
    """Conditional score distillation (DMD-style gradient form): d loss / d q_i = w (F_i - D_T,i), summed over
    positions and averaged over the batch. ``teacher_denoised`` and ``fake_denoised`` are (B, L, d) evaluations at
    the noised generated tokens (detached)."""
    q32 = q.float()
    diff = (fake_denoised - teacher_denoised).detach().float()
    if normalize:
        weight = 1.0 / ((q32.detach() - teacher_denoised.float()).abs().mean(dim=(1, 2), keepdim=True) + 1e-6)
    else:
        weight = torch.ones_like(q32[:, :1, :1])
    step = weight * diff
    target = (q32 - step).detach()
    loss = 0.5 * (q32 - target).pow(2).sum(-1).sum(-1).mean()
    return GeneratorLoss(loss, step.norm(dim=-1).mean().detach())


def teacher_denoised_at(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor,
                        codebook: torch.Tensor) -> torch.Tensor:
    """The analytic teacher denoiser for (B, L, d) points with (B, L) levels and (B, L, V) log-probs."""
    flat = analytic_denoiser(x.detach().reshape(-1, x.shape[-1]), s.reshape(-1),
                             log_probs.reshape(-1, log_probs.shape[-1]), codebook)
    return flat.reshape(x.shape)


def regression_loss(sample: GeneratorSample, target_ids: torch.Tensor, codebook: torch.Tensor,
                    output: str = "logits") -> torch.Tensor:
    """DD's pair regression at t = 0 on the head the generator samples with: cross-entropy of the logits against the
    pair's tokens (``output="logits"``) or the continuous head's squared error to their codebook vectors."""
    if output == "logits":
        return torch.nn.functional.cross_entropy(sample.logits.float().transpose(1, 2), target_ids)
    return (sample.tokens.float() - codebook[target_ids].float()).pow(2).mean()


def teacher_nll(log_probs: torch.Tensor, ids: torch.Tensor, floor: float = -30.0) -> torch.Tensor:
    """Mean -log p_teacher(id_i | ids_<i) of a generated sequence (codes the teacher filters out count as -floor)."""
    picked = log_probs.gather(-1, ids[..., None]).squeeze(-1).clamp_min(floor)
    return -picked.mean()

