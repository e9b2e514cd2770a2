"""DD2's two family operations (``ARFamily.teacher_log_probs`` and ``ARFamily.feature_trunk``) for both families,
on random-weight test presets and the bundled tiny teachers:

* teacher forcing reproduces the very distributions the sampler hands its chooser (CFG as the sampler applies
  it, temperature, top-k, top-p; the same -inf pattern);
* the feature trunk is a trainable, label-dropout-free, causal copy of the teacher whose features the teacher's
  own logits layer turns back into the teacher-forcing logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dd.models.presets import spec_from_yaml
from dd.sampling.choosers import token_positions
from dd.sampling.logits import SamplingConfig

from conftest import REPO_ROOT

PRESETS = ("gpt_test", "var_test", "gpt_tiny", "var_tiny")
BATCH = 3


@pytest.fixture(scope="module", params=PRESETS)
def built(request: pytest.FixtureRequest):
    spec = spec_from_yaml(REPO_ROOT / "configs" / "model" / f"{request.param}.yaml")
    torch.manual_seed(0)
    return spec, spec.build_family()


def vocab_size(family) -> int:
    return int(family.codebook().shape[0])


def labels_and_ids(family, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(family.num_classes, (batch,), generator=generator)
    ids = torch.randint(vocab_size(family), (batch, family.sequence_length), generator=generator)
    return labels, ids


def logits_layer(spec, family) -> torch.nn.Module:
    """The teacher's final linear layer (the one the trunk leaves out)."""
    return family.teacher.output if spec.family == "llamagen" else family.teacher.head


def teacher_forcing_logits(spec, family, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unguided teacher-forcing logits (B, L, V) through the teacher's own forward (eval mode)."""
    if spec.family == "llamagen":
        return family.teacher(labels, ids[:, :-1])
    from dd.models.var.vqvae import flat_to_scales

    inputs = family.tokenizer.indices_to_var_input(flat_to_scales(ids, family.teacher.patch_nums))
    return family.teacher(labels, inputs)


def sampling_configs(spec, family) -> list[SamplingConfig]:
    own = spec.sampling
    assert own.cfg_scale > 1.0, "the presets sample with guidance"
    k = vocab_size(family) // 4
    return [
        dataclasses.replace(own, top_k=k),  # the preset's guidance, plus top-k
        SamplingConfig(cfg_scale=0.0, temperature=0.9),  # no guidance (0: off for both families)
        SamplingConfig(cfg_scale=own.cfg_scale, temperature=1.1, top_p=0.7),
        SamplingConfig(cfg_scale=own.cfg_scale, cfg_interval=2, top_k=k, top_p=0.9),  # LlamaGen's guidance cut-off
    ]


class RecordingChooser:
    """Records the log-probs (B, L, V) the sampler hands over, draws with a seeded torch.multinomial."""

    def __init__(self, batch: int, length: int, vocab: int, seed: int) -> None:
        self.table = torch.full((batch, length, vocab), float("nan"))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, log_probs: torch.Tensor, position: int) -> torch.Tensor:
        self.table[:, token_positions(log_probs, position)] = log_probs.float()
        probs = log_probs.float().exp()
        ids = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=self.generator)
        return ids.reshape(probs.shape[:-1])


def test_teacher_log_probs_are_the_samplers_distributions(built) -> None:
    spec, family = built
    labels = torch.arange(BATCH) % family.num_classes
    length, vocab = family.sequence_length, vocab_size(family)
    for index, sampling in enumerate(sampling_configs(spec, family)):
        chooser = RecordingChooser(BATCH, length, vocab, seed=index)
        ids = family.teacher_generate(labels, 0, family.num_timesteps, None, sampling, chooser)
        assert ids.shape == (BATCH, length)
        recorded = chooser.table
        assert not recorded.isnan().any(), "every position went through the chooser"
        log_probs = family.teacher_log_probs(labels, ids, sampling)
        assert log_probs.shape == (BATCH, length, vocab) and log_probs.dtype == torch.float32
        assert not log_probs.requires_grad
        finite = recorded.isfinite()
        assert torch.equal(log_probs.isfinite(), finite), f"{sampling}: the filtered tokens differ"
        assert (log_probs[finite] - recorded[finite]).abs().max() < 1e-4, sampling
        assert log_probs.gather(-1, ids[..., None]).isfinite().all(), "every drawn token is allowed"
        if sampling.top_k or sampling.top_p < 1.0:
            assert (~finite).any(), f"{sampling} filters something"

    # label dropout is off whatever the teacher's mode, and the mode is restored
    sampling = sampling_configs(spec, family)[0]
    expected = family.teacher_log_probs(labels, ids, sampling)
    family.teacher.train()
    try:
        torch.manual_seed(1)
        again = family.teacher_log_probs(labels.repeat(8), ids.repeat(8, 1), sampling)
        assert family.teacher.training
    finally:
        family.teacher.eval()
    assert torch.equal(again, expected.repeat(8, 1, 1))


def test_feature_trunk_is_a_trainable_causal_copy(built) -> None:
    spec, family = built
    trunk = family.feature_trunk()
    teacher = family.teacher
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    trainable = [p for p in trunk.parameters() if p.requires_grad]
    head_size = sum(p.numel() for p in logits_layer(spec, family).parameters())
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in teacher.parameters()) - head_size
    assert isinstance(trunk.feature_dim, int)

    labels, ids = labels_and_ids(family, 24, seed=3)
    trunk.train()
    torch.manual_seed(2)
    features = trunk(labels, ids)
    assert features.shape == (24, family.sequence_length, trunk.feature_dim)
    assert torch.equal(trunk(labels, ids), features), "no label dropout in training mode"
    trunk.eval()
    with torch.no_grad():
        assert torch.equal(trunk(labels, ids), features)

    # causality: changing timestep k leaves the positions of timesteps <= k unchanged (and changes later ones)
    vocab = vocab_size(family)
    with torch.no_grad():
        for k in (family.num_timesteps // 2, family.num_timesteps - 1):
            start, stop = family.data_length(k), family.data_length(k + 1)
            changed = ids.clone()
            changed[:, start:stop] = (changed[:, start:stop] + 1) % vocab
            other = trunk(labels, changed)
            assert torch.allclose(other[:, :stop], features[:, :stop], rtol=0, atol=1e-6), k
            if stop < family.sequence_length:
                assert not torch.allclose(other[:, stop:], features[:, stop:]), k

    # gradients reach the parameters
    trunk.train()
    trunk(labels, ids).square().mean().backward()
    for name, param in trunk.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.isfinite().all(), name
        else:
            assert param.grad is None, name
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0

    # a copy: changing it leaves the teacher alone
    with torch.no_grad():
        for param in trunk.parameters():
            param.add_(1.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())


def test_teacher_head_on_trunk_features_gives_the_teacher_logits(built) -> None:
    spec, family = built
    trunk = family.feature_trunk().eval()
    labels, ids = labels_and_ids(family, BATCH, seed=4)
    with torch.no_grad():
        features = trunk(labels, ids)
        logits = logits_layer(spec, family)(features).float()
        expected = teacher_forcing_logits(spec, family, labels, ids).float()
    assert logits.shape == expected.shape == (BATCH, family.sequence_length, vocab_size(family))
    assert (logits - expected).abs().max() < 1e-4
    # and unguided, unfiltered teacher_log_probs is their log-softmax
    log_probs = family.teacher_log_probs(labels, ids, SamplingConfig(cfg_scale=0.0))
    assert (log_probs - logits.log_softmax(-1)).abs().max() < 1e-4


def test_flow_map_of_teacher_forced_distributions_rebuilds_every_pair(built) -> None:
    """A DD pair is a fixed point of teacher forcing: each token of ``generate_pair_batch`` is the flow map of its
    own noise under the distribution teacher forcing gives for the pair's prefix. So the pair path (sequential,
    KV-cached) and DD2's teacher scores (one parallel pass) see the same per-position distributions, and tokens
    mapped from other prefixes do change."""
    from dd.flow import FlowMapConfig, map_noise_to_tokens
    from dd.pairs.generation import generate_pair_batch
    from dd.sampling.seeds import per_sample_labels, per_sample_normal

    spec, family = built
    seeds = list(range(700, 700 + BATCH))
    labels = per_sample_labels(seeds, family.num_classes)
    flow = FlowMapConfig(num_steps=20)
    pairs = generate_pair_batch(family, seeds, labels, spec.sampling, flow)
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim))
    log_probs = family.teacher_log_probs(labels, pairs.indices, spec.sampling)
    rebuilt = map_noise_to_tokens(noise, log_probs, family.codebook(), flow).indices
    assert torch.equal(rebuilt, pairs.indices)
    # the same noise under another sequence's prefixes gives other tokens (the check above can fail)
    other = family.teacher_log_probs(labels, pairs.indices.roll(1, dims=0), spec.sampling)
    assert not torch.equal(map_noise_to_tokens(noise, other, family.codebook(), flow).indices, pairs.indices)
