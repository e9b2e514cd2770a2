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
  (``output="continuous"``: evaluate with ``schedule.split_t=0``). With Gumbel noise G (``method.code_draw=gumbel``)
  the code of a training step is instead a categorical draw, ``argmax(logits_i + G_i)`` ~ softmax(logits_i), and q_i
  its relaxation ``softmax((logits_i + G_i) / tau) @ codebook``; evaluation still takes the argmax.
* the *guidance* (fake score) network F: an "AR-diffusion" model, the teacher's trunk (features of position i from
  the tokens before it) with its logits head replaced by an MLP denoiser head ``F(features_i, x_s, s) -> q``; or, in
  the residual form (``method.guidance=residual``), the analytic teacher denoiser plus a learned correction,
  ``F = D_T + R(features_i, x_s, s, D_T)``, R zero at the start.
* the teacher, frozen, through ``family.teacher_log_probs`` (its per-position sampling distribution given a prefix).

Losses (``s`` drawn per token, ``eps`` fresh Gaussian noise):

* GTS (initialisation of F): regress the analytic teacher denoiser, ``||F(x_s, s | q_<i) - D_T(x_s, s)||^2``;
* fake score matching: ``||F(x_s, s | sg(q)_<i) - sg(q_i)||^2`` on the generator's own tokens;
* generator (conditional score distillation), in one of two forms (``method.loss_form``), both at the noised
  generated token of every position with the prefix as a stop-gradient (it enters the denoisers as ids), both
  weighted per sample by w = 1 / mean |q - D_T| (``normalize=True``), both zero in gradient when F equals the
  teacher's denoiser:

  - ``dmd`` (DMD-style gradient form, :func:`generator_loss`): the gradient w.r.t. q_i is ``w (F(x_s) - D_T(x_s))``
    with both denoisers detached, i.e. ``0.5 ||q - sg(q - w (F - D_T))||^2`` summed over positions;
  - ``sid`` (the SiD form the paper uses, :func:`sid_generator_loss`): ``w [(1 - alpha) ||D_T - F||^2 +
    (D_T - F)^T (F - q)]`` summed over positions, the gradient flowing through x_s into both denoisers (the
    analytic one exactly, the guidance network's head on frozen parameters and no-grad trunk features).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from dd.acceleration import full_precision


# -- analytic teacher denoiser / score ------------------------------------------------------------------------------
def analytic_denoiser(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor, codebook: torch.Tensor,
                      chunk_size: int = 2048) -> torch.Tensor:
    """E[q | x_s = x] under the Dirac mixture sum_k p_k delta(c_k), per row. x (N, d), s (N,) in (0, 1],
    log_probs (N, V) (-inf: excluded codes), codebook (V, d) -> (N, d), float32 (float64 when x is float64), also
    under autocast. Memory ~ chunk_size * V floats: without a graph (no input needs a gradient, or grad mode off)
    the chunks run plainly; when one is differentiated (SiD's generator loss differentiates x) each chunk runs
    under activation checkpointing, so the backward recomputes it instead of keeping every chunk's (rows, V)
    softmax alive."""
    if x.dim() != 2 or log_probs.dim() != 2 or s.dim() != 1:
        raise ValueError(f"expected x (N, d), s (N,), log_probs (N, V); got {tuple(x.shape)}, {tuple(s.shape)}, "
                         f"{tuple(log_probs.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape, dtype=dtype)
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (x, s, log_probs, codebook))
    out = []
    for i in range(0, x.shape[0], chunk_size):
        rows = (x[i:i + chunk_size], s[i:i + chunk_size], log_probs[i:i + chunk_size], codebook)
        if graph:
            out.append(checkpoint(_denoise_chunk, *rows, dtype, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(_denoise_chunk(*rows, dtype))
    return torch.cat(out)


def _denoise_chunk(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor, codebook: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """:func:`analytic_denoiser` of one chunk of rows, in ``dtype`` whatever autocast is active."""
    with torch.autocast(x.device.type, enabled=False):
        x, s, log_probs, c = x.to(dtype), s.to(dtype), log_probs.to(dtype), codebook.to(dtype)
        a = (1.0 - s)[:, None]
        inv = 1.0 / (s * s)[:, None]
        logits = log_probs + (a * (x @ c.t()) - 0.5 * a * a * (c * c).sum(1)[None, :]) * inv
        return torch.softmax(logits, dim=1) @ c


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
    entry) so every noise level feeds unit-size inputs; the head predicts the clean token directly.

    ``residual=True``: the head also reads a base denoiser's output at x_s (the analytic teacher denoiser, divided by
    sqrt(token_var)) and predicts a correction to it; its output layer starts at zero, so the corrected denoiser
    starts as the base exactly."""

    def __init__(self, feature_dim: int, token_dim: int, width: int = 256, depth: int = 3,
                 time_dim: int = 64, token_var: float = 1.0, residual: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"head depth={depth} must be >= 1")
        self.token_var, self.residual = float(token_var), bool(residual)
        self.time = TimeEmbedding(time_dim)
        inputs = feature_dim + token_dim * (2 if residual else 1) + time_dim
        layers: list[nn.Module] = [nn.Linear(inputs, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, token_dim)
        if residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                base: torch.Tensor | None = None) -> torch.Tensor:
        if self.residual and base is None:
            raise ValueError("a residual denoiser head needs the base denoiser's output at x (base=...)")
        # float32 even under bf16 autocast (a small MLP): the generator's signal is the small difference between
        # this output and the analytic teacher denoiser's, which bf16 rounding (~0.4%) would bury
        with full_precision(x.device.type):
            scale = torch.sqrt((1.0 - s) ** 2 * self.token_var + s * s)[..., None]
            parts = [features.float(), x.float() / scale, self.time(s)]
            if self.residual:
                parts.append(base.float() / math.sqrt(self.token_var))
            out = self.out(self.mlp(torch.cat(parts, dim=-1)))
            return base.float() + out if self.residual else out


class ARDenoiser(nn.Module):
    """The AR-diffusion model: a feature trunk (``family.feature_trunk()``: features of position i from labels and
    the ids before it) and a :class:`DenoiseHead`. ``forward(labels, ids, x_s, s)`` denoises every position at once:
    ids (B, L) is the (snapped) sequence whose prefixes condition the positions, x_s (B, L, d), s (B, L).

    ``residual=True`` (``method.guidance=residual``): the network is the analytic teacher denoiser at x_s plus a
    learned correction, ``F = D_T + R``, with R = 0 at initialisation, so F starts equal to the teacher's denoiser
    exactly (what GTS approximates by regression) and only the difference between the generator's and the
    teacher's conditional distributions has to be learned. ``forward`` then needs ``base`` = D_T(x_s)."""

    def __init__(self, trunk: nn.Module, token_dim: int, width: int = 256, depth: int = 3,
                 token_var: float = 1.0, residual: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = DenoiseHead(int(trunk.feature_dim), token_dim, width, depth, token_var=token_var,
                                residual=residual)

    @property
    def residual(self) -> bool:
        return self.head.residual

    def features(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.trunk(labels, ids)

    def forward(self, labels: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                features: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            features = self.features(labels, ids)
        return self.head(features, x, s, base)


# -- generator output -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorSample:
    """q (B, L, d): differentiable tokens; ids (B, L): their codes (the sample dd.eval produces); tokens and logits:
    the student's two heads (for the optional regression term)."""

    q: torch.Tensor
    ids: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u), float32, drawn on ``device`` with ``generator`` (a generator of that
    device); u is kept inside (0, 1) so the noise is finite."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - 2.0 ** -24)))


def generator_sample(student: nn.Module, labels: torch.Tensor, noise: torch.Tensor, output: str = "logits",
                     temperature: float = 1.0, straight_through: bool = False,
                     gumbel: torch.Tensor | None = None) -> GeneratorSample:
    """One forward of the DD student at t = 0 -> generated tokens (see the module docstring for ``output``).

    ``straight_through``: q's value is the code of ``ids`` (the token ``dd.eval`` samples, so the guidance network
    and the teacher denoiser see exactly the generator's sampled distribution), its gradient the soft token's
    (``hard + soft - sg(soft)``). ``gumbel`` (B, L, V), logits output only: the codes are ``argmax(logits +
    gumbel)`` (categorical draws from softmax(logits) for standard Gumbel noise) and q their Gumbel-softmax
    relaxation at ``temperature``."""
    t = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    tokens, logits = student(noise, labels, t)
    codebook = student.codebook
    if output == "logits":
        # with Gumbel noise: a categorical draw from softmax(logits) (Gumbel-max) and its relaxation
        scores = logits.float() if gumbel is None else logits.float() + gumbel
        with full_precision(scores.device.type):  # a bf16 matmul would round q, whose small moves DD2 makes
            soft, ids = torch.softmax(scores / temperature, dim=-1) @ codebook.float(), scores.argmax(-1)
    elif output == "continuous":
        if gumbel is not None:
            raise ValueError("Gumbel draws need the logits output (the continuous head has no distribution)")
        soft, ids = tokens.float(), student.nearest_indices(tokens.detach())
    else:
        raise ValueError(f"dd2 generator output={output!r}: expected 'logits' or 'continuous'")
    q = codebook.float()[ids] + (soft - soft.detach()) if straight_through else soft
    return GeneratorSample(q, ids, tokens, logits)


# -- losses ---------------------------------------------------------------------------------------------------------
def gts_loss(fake: ARDenoiser, labels: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, log_probs: torch.Tensor,
             codebook: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Regression of the analytic teacher denoiser at x_s = noised(q): mean over tokens of the squared error. For a
    direct guidance network only: a residual one starts at this target (its head raises for the missing base)."""
    x = noised(q.detach().float(), s, eps)
    with torch.no_grad():
        target = teacher_denoised_at(x, s, log_probs, codebook)
    return (fake(labels, ids, x, s) - target).pow(2).sum(-1).mean()


def fake_score_loss(fake: ARDenoiser, labels: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                    eps: torch.Tensor, features: torch.Tensor | None = None,
                    teacher_denoiser: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Denoising score matching on the generator's (detached) tokens, conditioned on their snapped prefixes.
    ``features``: the trunk's features of ``ids`` under the current weights, if already computed (with a graph).
    ``teacher_denoiser`` (x -> D_T(x), e.g. :func:`teacher_denoiser_fn`): the base of a residual network."""
    q = q.detach().float()
    x = noised(q, s, eps)
    base = None
    if fake.residual:
        if teacher_denoiser is None:
            raise ValueError("a residual guidance network needs teacher_denoiser (its base) for score matching")
        with torch.no_grad():
            base = teacher_denoiser(x.detach())
    return (fake(labels, ids, x, s, features=features, base=base) - q).pow(2).sum(-1).mean()


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
    step = _sample_weight(q32, teacher_denoised.float(), normalize) * diff
    target = (q32 - step).detach()
    loss = 0.5 * (q32 - target).pow(2).sum(-1).sum(-1).mean()
    return GeneratorLoss(loss, step.norm(dim=-1).mean().detach())


def _sample_weight(q: torch.Tensor, teacher_denoised: torch.Tensor, normalize: bool) -> torch.Tensor:
    """DMD's per-sample normalisation (B, 1, 1), detached: 1 / mean |q - D_T| (or 1 without ``normalize``)."""
    if not normalize:
        return torch.ones_like(q[:, :1, :1]).detach()
    return 1.0 / ((q.detach() - teacher_denoised.detach()).abs().mean(dim=(1, 2), keepdim=True) + 1e-6)


def sid_generator_loss(q: torch.Tensor, s: torch.Tensor, eps: torch.Tensor,
                       teacher_denoiser: Callable[[torch.Tensor], torch.Tensor],
                       fake_denoiser: Callable[[torch.Tensor], torch.Tensor], alpha: float = 1.2,
                       normalize: bool = True) -> GeneratorLoss:
    """Conditional score distillation in the SiD loss form (Score identity Distillation, Zhou et al. 2024).

    Per generated token q_i (B, L, d; its prefix enters the denoisers as ids, so it is a stop-gradient) noised to
    ``x = (1 - s) q + s eps`` *with* the gradient flowing through x, teacher ``D = teacher_denoiser(x)`` and fake
    ``F = fake_denoiser(x, D)`` (both differentiable in x; the fake may use the teacher's D, as a residual guidance
    network does, or ignore it; the fake's parameters must not take gradients from this loss, see
    :func:`frozen_fake_denoiser`), the loss is ::

        w * [ (1 - alpha) ||D - F||^2 + (D - F)^T (F - q) ]

    summed over positions and averaged over the batch, with DMD's per-sample weight w (``normalize``; detached).
    Its value and gradient vanish when F is the teacher's denoiser; ``grad_norm`` is the mean per-token norm of
    w (F - D), the same signal size the DMD form logs."""
    q = q if q.dtype == torch.float64 else q.float()
    x = noised(q, s, eps)
    teacher_d = teacher_denoiser(x).to(q.dtype)
    fake_d = fake_denoiser(x, teacher_d).to(q.dtype)
    diff = teacher_d - fake_d
    weight = _sample_weight(q, teacher_d, normalize)
    per_token = (1.0 - alpha) * diff.pow(2).sum(-1) + (diff * (fake_d - q)).sum(-1)
    loss = (weight[..., 0] * per_token).sum(-1).mean()
    return GeneratorLoss(loss, (weight * diff).norm(dim=-1).mean().detach())


def frozen_fake_denoiser(fake: ARDenoiser, labels: torch.Tensor, ids: torch.Tensor, s: torch.Tensor,
                         features: torch.Tensor | None = None
                         ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(x (B, L, d), teacher's D_T(x) or None) -> F(x, s | ids_<i): the guidance network's head at trunk features
    computed once, without a graph, from ``ids`` (or the given ``features``, detached here); differentiable in x (and
    in D_T(x), the base of a residual network), while the head runs on detached copies of its parameters, so a
    backward through it leaves every ``.grad`` of ``fake`` untouched (the SiD generator loss)."""
    if features is None:
        with torch.no_grad():
            features = fake.features(labels, ids)
    features = features.detach()
    params = {name: p.detach() for name, p in fake.head.named_parameters()}
    return lambda x, base=None: functional_call(fake.head, params, (features, x, s, base))


def teacher_denoiser_fn(s: torch.Tensor, log_probs: torch.Tensor,
                        codebook: torch.Tensor) -> Callable[..., torch.Tensor]:
    """x (B, L, d) -> the analytic teacher denoiser D_T(x, s) at levels s (B, L) with log-probs (B, L, V),
    differentiable in x (the SiD generator loss). A second argument (the teacher's denoiser at x, which a residual
    guidance network reads) is accepted and ignored, so the function can stand where a guidance network does."""
    return lambda x, base=None: teacher_denoised_at(x, s, log_probs, codebook, differentiable=True)


def teacher_denoised_at(x: torch.Tensor, s: torch.Tensor, log_probs: torch.Tensor, codebook: torch.Tensor,
                        differentiable: bool = False) -> torch.Tensor:
    """The analytic teacher denoiser for (B, L, d) points with (B, L) levels and (B, L, V) log-probs. x is detached
    unless ``differentiable`` (SiD's generator loss differentiates the denoiser w.r.t. x)."""
    x = x if differentiable else x.detach()
    flat = analytic_denoiser(x.reshape(-1, x.shape[-1]), s.reshape(-1), log_probs.reshape(-1, log_probs.shape[-1]),
                             codebook)
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

