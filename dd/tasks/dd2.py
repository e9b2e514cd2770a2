"""The DD2 trainer (``python -m dd.train method=dd2``): conditional score distillation, no pair dataset.

A Lightning module with manual optimisation of two networks (``dd.distill.dd2``): the one-step generator (the
family's DD student, exported like a DD run so ``dd.eval`` samples it unchanged) and the guidance network (an
AR-diffusion model built from the teacher's trunk). Per batch of (label, noise) drawn from per-sample seeds:

1. the first ``gts_steps`` batches initialise the guidance network by regressing the analytic teacher denoiser
   (GTS) on tokens drawn from the teacher's own per-position distributions given the generator's prefixes; with
   ``generator_init=ar_diffusion`` the last of them then copies the fine-tuned trunk into the generator (and its EMA);
2. afterwards each batch makes one generator update (conditional score distillation, ``loss_form`` dmd or sid) and
   the generator's EMA update, then ``fake_updates`` guidance updates (score matching on the same generated tokens,
   detached).

Exactly one Lightning-wrapped optimizer step happens per batch (the guidance network's in phase 1, the generator's
in phase 2; the guidance steps of phase 2 call the raw optimizer), so ``trainer.global_step`` counts batches and
``max_steps``, ``ckpt_every``, ``snapshot_every`` and ``val_every_steps`` mean what they mean for DD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from dd.checkpoint import load_entries
from dd.distill.dd2 import (ARDenoiser, fake_score_loss, frozen_fake_denoiser, generator_loss, generator_sample,
                            gts_loss, gumbel_noise, noised, regression_loss, sample_noise_levels, sid_generator_loss,
                            teacher_denoised_at, teacher_denoiser_fn, teacher_nll)
from dd.distill.ema import EMA
from dd.lr import check_final_ratio, decayed
from dd.models.protocol import ARFamily
from dd.runs import world_size
from dd.sampling.choosers import inverse_cdf
from dd.sampling.logits import SamplingConfig
from dd.sampling.seeds import per_sample_labels, per_sample_normal
from dd.tasks.distillation import StepIndexedData


#: method.loss_form values (dd.distill.dd2: generator_loss, sid_generator_loss)
LOSS_FORMS = ("dmd", "sid")

#: method.guidance values (dd.distill.dd2.ARDenoiser: residual=False / True)
GUIDANCE_FORMS = ("direct", "residual")

#: method.code_draw values (dd.distill.dd2.generator_sample: gumbel=None / Gumbel noise)
CODE_DRAWS = ("argmax", "gumbel")


@dataclass(frozen=True)
class DD2Config:
    """``configs/method/dd2.yaml`` (see the comments there)."""

    generator_output: str = "logits"
    temperature: float = 1.0
    straight_through: bool = False  # the generator's token is its sampled code (gradient of the soft token)
    code_draw: str = "argmax"  # argmax | gumbel: the training codes are draws from softmax(logits) (Gumbel-max)
    gts_steps: int = 200
    fake_updates: int = 1
    lr_generator: float = 1e-4
    lr_fake: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_decay: str = "cosine"  # cosine (both networks, over the DD2 steps) | none (constant after warm-up)
    min_lr_ratio: float = 0.1  # lr_decay=cosine: final learning rate / base learning rate
    s_min: float = 0.02
    s_max: float = 0.98
    normalize: bool = True
    grad_clip: float = 1.0
    guidance: str = "direct"  # direct (the paper's AR-diffusion head, GTS-initialised) | residual (D_T + correction)
    head_width: int = 256
    head_depth: int = 3
    dd_weight: float = 0.0  # > 0: add DD's pair regression (needs data.pairs_dir) to the generator loss
    loss_form: str = "sid"  # generator loss: sid (SiD, Zhou et al. 2024) | dmd (gradient form, denoisers detached)
    sid_alpha: float = 1.2  # SiD's alpha (loss_form=sid)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.generator_output not in ("logits", "continuous"):
            raise ValueError(f"method.generator_output={self.generator_output!r}: expected 'logits' or 'continuous'")
        if self.code_draw not in CODE_DRAWS:
            raise ValueError(f"method.code_draw={self.code_draw!r}: expected one of {', '.join(CODE_DRAWS)}")
        if self.code_draw == "gumbel" and self.generator_output != "logits":
            raise ValueError("method.code_draw=gumbel draws the generator's codes from its logits head: it needs "
                             f"method.generator_output=logits (got {self.generator_output!r})")
        if self.gts_steps < 0 or self.fake_updates < 1:
            raise ValueError("method.gts_steps must be >= 0 and method.fake_updates >= 1")
        if not 0.0 < self.s_min <= self.s_max <= 1.0:
            raise ValueError(f"method.s_min={self.s_min}, s_max={self.s_max}: need 0 < s_min <= s_max <= 1")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"method.loss_form={self.loss_form!r}: expected one of {', '.join(LOSS_FORMS)}")
        if not math.isfinite(self.sid_alpha):
            raise ValueError(f"method.sid_alpha={self.sid_alpha} must be a finite number")
        if self.guidance not in GUIDANCE_FORMS:
            raise ValueError(f"method.guidance={self.guidance!r}: expected one of {', '.join(GUIDANCE_FORMS)}")
        if self.guidance == "residual" and self.gts_steps > 0:
            raise ValueError(f"method.guidance={self.guidance} starts the guidance network equal to the teacher's "
                             f"denoiser, so GTS (method.gts_steps={self.gts_steps}) has nothing to fit and would "
                             "only spend time: set method.gts_steps=0")
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"method.lr_decay={self.lr_decay!r}: expected 'none' or 'cosine'")
        check_final_ratio(self.min_lr_ratio, "method.min_lr_ratio")
        if self.dd_weight < 0:
            raise ValueError(f"method.dd_weight={self.dd_weight} must be >= 0")
        if min(self.lr_generator, self.lr_fake) <= 0 or self.temperature <= 0:
            raise ValueError("method.lr_generator, lr_fake and temperature must be > 0")


#: keys of configs/method/dd2.yaml that are not DD2Config fields (read by build_dd2_task itself)
TASK_KEYS = ("name", "run_suffix", "generator_init", "noise_pool", "val_samples", "default_batch_size")


GENERATOR_INITS = ("teacher", "ar_diffusion")


def _generator_init(method: dict[str, Any]) -> str:
    """``method.generator_init``: one of GENERATOR_INITS or the path of a DD student export (default: teacher)."""
    return str(method.get("generator_init") or "teacher")


def dd2_config(method: dict[str, Any]) -> DD2Config:
    """The DD2Config of a resolved ``method`` config group (raises TypeError / ValueError on bad settings, including
    a ``generator_init`` that is neither a known initialisation nor an existing file or hub path)."""
    init = _generator_init(method)
    if init not in GENERATOR_INITS and "://" not in init and not Path(init).expanduser().is_file():
        raise ValueError(f"method.generator_init={init!r}: expected one of {', '.join(GENERATOR_INITS)} or the path "
                         "of a DD student export (e.g. outputs/train/<run>/export/student_ema.pt); no such file")
    return DD2Config(**{k: v for k, v in method.items() if k not in TASK_KEYS})


class NoiseLabelDataset(Dataset):
    """Item i: a uniform class label and a (L, d) standard-normal noise sequence, both from the seed
    ``seed_base + i`` (the streams ``dd.eval`` uses), so any item can be regenerated exactly."""

    def __init__(self, num_items: int, length: int, token_dim: int, num_classes: int, seed_base: int) -> None:
        self.num_items, self.shape, self.num_classes, self.seed_base = num_items, (length, token_dim), num_classes, seed_base

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed = [self.seed_base + int(index)]
        return {"label": per_sample_labels(seed, self.num_classes)[0], "noise": per_sample_normal(seed, self.shape)[0]}


class DD2Task(StepIndexedData, L.LightningModule):
    """Generator + guidance network + frozen teacher (``family``); see the module docstring."""

    def __init__(self, family: ARFamily, generator: torch.nn.Module, fake: ARDenoiser, sampling: SamplingConfig,
                 config: DD2Config, ema_decay: float, train_data: Dataset, val_data: Dataset, batch_size: int,
                 num_workers: int = 0, seed: int = 0, generator_from_guidance: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.family = family
        self.teacher = family.teacher.eval().requires_grad_(False)  # registered: moves with the module
        self.tokenizer = family.tokenizer.eval().requires_grad_(False)
        self.student = generator
        self.fake = fake
        self.ema = EMA(generator, ema_decay)
        self.sampling, self.config = sampling, config
        self.train_data, self.val_data = train_data, val_data
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.generator_from_guidance = generator_from_guidance
        if generator_from_guidance and config.gts_steps == 0:  # no GTS: the AR-diffusion trunk is the teacher's
            self._init_generator_from_guidance()

    def _init_generator_from_guidance(self) -> None:
        """``method.generator_init=ar_diffusion``: the generator's parameters that DD's initialisation copied from the
        teacher take the AR-diffusion (guidance) trunk's current weights (the family's mapping), and the EMA
        restarts from the result. Runs once, at the end of the last GTS batch; a checkpoint taken from then on
        holds the copied weights, so a resumed run neither repeats nor misses it."""
        weights = self.family.student_weights_from_trunk(self.student, self.fake.trunk)
        with torch.no_grad():
            load_entries(self.student, weights, what="DD2 generator (from the AR-diffusion trunk)")
        self.ema.sync(self.student)

    def train(self, mode: bool = True) -> "DD2Task":
        super().train(mode)
        self.teacher.eval()
        self.tokenizer.eval()
        self.ema.shadow.eval()
        return self

    # -- optimisation -------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        gen = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr_generator, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
        fake = torch.optim.AdamW(self.fake.parameters(), lr=cfg.lr_fake, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay)
        return [gen, fake]

    def _schedule_lr(self, optimizer: torch.optim.Optimizer, base_lr: float, step: int, decay_steps: int = 0) -> None:
        """Linear warm-up over ``warmup_steps``; with ``lr_decay=cosine`` and ``decay_steps`` > 0, then a cosine from
        the base rate down to ``min_lr_ratio`` of it at step ``decay_steps``."""
        factor = min(1.0, (step + 1) / max(self.config.warmup_steps, 1))
        if self.config.lr_decay == "cosine" and decay_steps > 0:
            factor *= decayed(step / decay_steps, self.config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor

    def _dd2_steps(self) -> int:
        """Batches of phase 2 (DD2 updates) in the run: ``max_steps`` minus the GTS batches (0 when unknown)."""
        total = int(self.trainer.max_steps) if self._trainer is not None else -1
        return max(total - self.config.gts_steps, 0)

    def _levels(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = sample_noise_levels(shape, self.config.s_min, self.config.s_max, generator, self.device)
        eps = torch.randn((*shape, self.family.token_dim), generator=generator).to(self.device)
        return s, eps

    def _sample(self, labels: torch.Tensor, noise: torch.Tensor, model: torch.nn.Module | None = None,
                generator: torch.Generator | None = None):
        """The generator's tokens for a batch. Training passes the step's ``generator``: with ``code_draw=gumbel``
        the codes are then categorical draws (Gumbel noise on the batch's device from a seed of ``generator``, so a
        resumed run draws the same); without it (validation) the codes are the argmax, as ``dd.eval`` samples."""
        gumbel = None
        if self.config.code_draw == "gumbel" and generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            device_generator = torch.Generator(device=noise.device).manual_seed(seed)
            shape = tuple(noise.shape[:2]) + (self.student.codebook.shape[0],)
            gumbel = gumbel_noise(shape, device_generator, noise.device)
        return generator_sample(model if model is not None else self.student, labels, noise,
                                self.config.generator_output, self.config.temperature, self.config.straight_through,
                                gumbel)

    def _update(self, optimizer: Any, loss: torch.Tensor, parameters: Any) -> None:
        parameters = list(parameters)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._average_gradients(parameters)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        optimizer.step()

    def _average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Average gradients over DDP ranks explicitly: DDP's reducer syncs one backward per forward, and a DD2 batch
        makes two or more. Idempotent where DDP already averaged (the ranks then hold equal gradients)."""
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        world = self.trainer.world_size
        for param in parameters:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(world)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = int(self.batches_seen)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 101 + rank)
        self.batches_seen += 1
        labels, noise = batch["label"], batch["noise"]
        gen_opt, fake_opt = self.optimizers()
        codebook = self.student.codebook
        shape = tuple(labels.shape) + (self.family.sequence_length,)
        cfg = self.config
        if step < cfg.gts_steps:  # phase 1: guidance network <- analytic teacher denoiser
            self._schedule_lr(fake_opt.optimizer, cfg.lr_fake, step)
            with torch.no_grad():
                ids = self._sample(labels, noise, generator=generator).ids
                log_probs = self.family.teacher_log_probs(labels, ids, self.sampling)
                uniforms = 1.0 - torch.rand(ids.shape, generator=generator, dtype=torch.float64)
                drawn = inverse_cdf(log_probs.exp(), uniforms)  # token i ~ p_i(. | generated prefix)
            s, eps = self._levels(shape, generator)
            loss = gts_loss(self.fake, labels, ids, codebook[drawn], log_probs, codebook, s, eps)
            self._update(fake_opt, loss, self.fake.parameters())
            if self.generator_from_guidance and int(self.batches_seen) == cfg.gts_steps:  # GTS ends here
                self._init_generator_from_guidance()
            self.log_dict({"train/loss": loss, "train/dd2_gts": loss}, prog_bar=True, on_step=True, on_epoch=False,
                          batch_size=labels.shape[0])
            return
        dd2_step = step - cfg.gts_steps
        decay_steps = self._dd2_steps()
        self._schedule_lr(fake_opt.optimizer, cfg.lr_fake, dd2_step, decay_steps)
        self._schedule_lr(gen_opt.optimizer, cfg.lr_generator, dd2_step, decay_steps)
        sample = self._sample(labels, noise, generator=generator)
        s, eps = self._levels(shape, generator)
        with torch.no_grad():
            log_probs = self.family.teacher_log_probs(labels, sample.ids, self.sampling)
        # the guidance trunk's features of the generated prefixes, with a graph: read detached by the generator loss,
        # then reused by the first guidance update (the guidance weights do not change in between)
        features = self.fake.features(labels, sample.ids)
        if cfg.loss_form == "sid":  # gradient through x_s into both denoisers; the guidance network stays frozen
            terms = sid_generator_loss(sample.q, s, eps, teacher_denoiser_fn(s, log_probs, codebook),
                                       frozen_fake_denoiser(self.fake, labels, sample.ids, s, features),
                                       cfg.sid_alpha, cfg.normalize)
        else:
            with torch.no_grad():
                x = noised(sample.q.detach().float(), s, eps)
                teacher_d = teacher_denoised_at(x, s, log_probs, codebook)
                fake_d = self.fake(labels, sample.ids, x, s, features=features.detach(),
                                   base=teacher_d if self.fake.residual else None)
            terms = generator_loss(sample.q, teacher_d, fake_d, cfg.normalize)
        loss = terms.loss
        if cfg.dd_weight > 0:  # DD's regression on the batch's pairs (same noise, same forward)
            regression = regression_loss(sample, batch["indices"], codebook, cfg.generator_output)
            loss = loss + cfg.dd_weight * regression
            self.log("train/dd2_regression", regression.detach(), on_step=True, on_epoch=False,
                     batch_size=labels.shape[0])
        self._update(gen_opt, loss, self.student.parameters())
        self.ema.update(self.student)
        for update in range(cfg.fake_updates):  # guidance network <- score of the generator's samples (this batch's)
            s, eps = self._levels(shape, generator)
            fake_loss = fake_score_loss(self.fake, labels, sample.ids, sample.q.detach(), s, eps,
                                        features if update == 0 else None, teacher_denoiser_fn(s, log_probs, codebook))
            self._update(fake_opt.optimizer, fake_loss, self.fake.parameters())  # raw: not a Lightning step
        self.log_dict({"train/loss": terms.loss.detach(), "train/dd2_fake": fake_loss.detach(),
                       "train/dd2_signal": terms.grad_norm, "train/teacher_nll": teacher_nll(log_probs, sample.ids)},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=labels.shape[0])

    # -- validation (EMA generator) -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels, noise = batch["label"], batch["noise"]
        ids = self._sample(labels, noise, self.ema.shadow).ids
        log_probs = self.family.teacher_log_probs(labels, ids, self.sampling)
        size = labels.shape[0]
        self.log("val/teacher_nll", teacher_nll(log_probs, ids), batch_size=size, sync_dist=True, prog_bar=True)
        # diversity: fraction of positions where two samples of the batch differ (0 = every sample alike)
        differ = (ids[:, None, :] != ids[None, :, :]).float().mean(-1)
        pairs = size * (size - 1)
        self.log("val/pairwise_token_diversity", differ.sum() / max(pairs, 1), batch_size=size, sync_dist=True)


def build_dd2_task(cfg: dict[str, Any], spec: Any, family: ARFamily, pairs: tuple[Dataset, Dataset] | None = None
                   ) -> DD2Task:
    """The DD2 task of a resolved ``dd.train`` config with ``method=dd2``: generator from the teacher (or the DD
    student export ``method.generator_init`` names; ``ar_diffusion``: from the teacher, then from the guidance
    network's trunk when GTS ends), guidance network from the teacher's trunk. ``pairs`` (train, validation): DD pair
    datasets, used instead of fresh noise when ``method.dd_weight > 0``."""
    config = dd2_config(cfg["method"])
    init = _generator_init(cfg["method"])
    if init in GENERATOR_INITS:
        generator = spec.build_student(family.codebook(), init="teacher", teacher=family.teacher)
    else:
        generator = spec.build_student(family.codebook(), init="checkpoint", checkpoint=init)
    codebook = family.codebook().float()
    fake = ARDenoiser(family.feature_trunk(), family.token_dim, config.head_width, config.head_depth,
                      token_var=float(codebook.detach().pow(2).mean()), residual=config.guidance == "residual")
    batch, steps, seed = int(cfg["batch_size"]), int(cfg["max_steps"]), int(cfg["seed"])
    world = world_size(cfg["trainer"])
    pool = int(cfg["method"].get("noise_pool") or batch * world * steps)  # default: fresh noise every step, every rank
    train = NoiseLabelDataset(max(pool, batch * world), family.sequence_length, family.token_dim,
                              family.num_classes, seed_base=1_000_000_000 + seed * 10_000_000)
    val = NoiseLabelDataset(int(cfg["method"].get("val_samples", 256)), family.sequence_length, family.token_dim,
                            family.num_classes, seed_base=2_000_000_000)
    if config.dd_weight > 0:
        if pairs is None:
            raise ValueError("method.dd_weight > 0 needs pairs (data.pairs_dir)")
        train, val = pairs
    return DD2Task(family, generator, fake, spec.sampling, config, float(cfg["ema_decay"]), train, val, batch,
                   int(cfg["num_workers"]), seed, generator_from_guidance=init == "ar_diffusion")


def export_schedule(cfg: dict[str, Any], spec: Any) -> dict[str, Any]:
    """What ``dd.eval`` should sample a DD2 generator with: one step, every token from the head it was trained on
    (logits: split_t = the whole sequence; continuous: split_t = 0)."""
    logits = str(cfg["method"].get("generator_output", "logits")) == "logits"
    return {"t_list": [0], "split_t": int(spec.num_timesteps) if logits else 0}
