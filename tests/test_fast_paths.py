"""Fast paths (``dd.acceleration``): every one gives the eager path's tokens.

Default suite (CPU, seconds): ``torch.compile`` with the ``aot_eager`` backend (``DD_COMPILE_BACKEND``: the full
Dynamo capture and functionalisation of the in-place KV-cache writes, no code generation), CUDA-graph bookkeeping
with an emulated capture (replay = rerun on the captured static buffers), the static full-cache decode step, bf16
autocast agreement (reported, not asserted) and autocast-proof flow map / snapping. ``slow``: the same with Inductor
(its first compile takes ~15-30 s on a small CPU). ``gpu``: real CUDA graphs and ``reduce-overhead`` compiles
(``scripts/device_check.sh`` runs them).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dd.acceleration import (
    FAST_PATHS,
    CudaGraphCallable,
    FastPathError,
    accelerate,
    check_fast_path,
)
from dd.evaluation.samplers import EvalModels, FewStepSampler, TeacherInvolvedSampler, TeacherSampler
from dd.flow import FlowMapConfig, map_noise_to_tokens
from dd.models.codebook import nearest_code_indices
from dd.models.presets import random_weights, spec_from_yaml
from dd.pairs.generation import generate_pair_batch
from dd.sampling.seeds import per_sample_labels, per_sample_normal, per_sample_uniform, sample_seeds

from conftest import REPO_ROOT

PRESETS = ("gpt_test", "var_test")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fast_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile through aot_eager: graph capture without the Inductor compile time."""
    monkeypatch.setenv("DD_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()


@pytest.fixture
def inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DD_COMPILE_BACKEND", "inductor")
    torch._dynamo.reset()


def build(preset: str, device: str = "cpu"):
    """Spec, family and student of a test preset with seeded random weights (as scripts/bench_speed.py)."""
    spec = spec_from_yaml(REPO_ROOT / "configs" / "model" / f"{preset}.yaml")
    tokenizer, teacher = spec.build_tokenizer(load=False), spec.build_teacher(load=False)
    random_weights(tokenizer, 0)
    random_weights(teacher, 1)
    family = spec.make_family(tokenizer.to(device).eval(), teacher.to(device).eval())
    student = spec.build_student(family.codebook(), init="random")
    random_weights(student, 2)
    student.set_codebook(family.codebook())
    return spec, family, student.to(device).eval()


def inputs(family, batch: int, device: str = "cpu", seed_base: int = 0):
    seeds = sample_seeds(seed_base, 0, batch)
    labels = per_sample_labels(seeds, family.num_classes).to(device)
    noise = per_sample_normal(seeds, (family.sequence_length, family.token_dim), device=device)
    uniforms = per_sample_uniform(seeds, family.sequence_length, device=device)
    return labels, noise, uniforms


def samplers(spec) -> dict[str, object]:
    t_list, split = tuple(spec.default_t_list), spec.default_split_t
    return {"teacher": TeacherSampler(spec.sampling), "fewstep": FewStepSampler(t_list, split),
            "onestep": FewStepSampler((0,), split),
            "teacher_involved": TeacherInvolvedSampler(t_list, split, t_list[1] - 1, spec.sampling)}


def sample_all(models: EvalModels, spec, labels, noise, uniforms) -> dict[str, torch.Tensor]:
    """Token ids of every sampler (continuous student outputs snapped to the codebook) and the raw sequences."""
    out = {}
    for name, sampler in samplers(spec).items():
        sequence = sampler.sample(models, labels, noise, uniforms).sequence
        out[name] = nearest_code_indices(sequence, models.family.codebook())
        out[name + "/sequence"] = sequence
    return out


def set_fast_path(models: EvalModels, fast_path: str, dtype=None) -> None:
    models.family.set_fast_path(fast_path)
    models.student.set_fast_path(fast_path, dtype=dtype)


def assert_same_tokens(fast: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    for name in eager:
        if name.endswith("/sequence"):
            torch.testing.assert_close(fast[name], eager[name], atol=atol, rtol=1e-4, msg=name)
        else:
            assert torch.equal(fast[name], eager[name]), f"{name}: fast path tokens differ from eager"


# -- settings and errors -------------------------------------------------------------------------------------------
def test_fast_path_settings_are_validated() -> None:
    assert FAST_PATHS == ("eager", "compile", "cuda_graph")
    with pytest.raises(ValueError, match="fast_path='jit'"):
        check_fast_path("jit")
    with pytest.raises(ValueError, match="FlowMapConfig.fast_path"):
        FlowMapConfig(fast_path="graph")
    assert accelerate(len, "eager") is len


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_graphs_are_refused_without_cuda_with_a_clear_error() -> None:
    _, family, student = build("gpt_test")
    for configure in (lambda: student.set_fast_path("cuda_graph"), lambda: family.set_fast_path("cuda_graph"),
                      lambda: FlowMapConfig(fast_path="cuda_graph")):
        with pytest.raises(FastPathError, match="needs a CUDA device.*use fast_path='compile' or 'eager'"):
            configure()


def test_cuda_graph_callable_refuses_cpu_tensors() -> None:
    graphed = CudaGraphCallable(lambda x: x + 1)
    with pytest.raises(FastPathError, match=r"CUDA graphs need every input on a CUDA device"):
        graphed(torch.ones(2))


# -- CUDA-graph bookkeeping, emulated on the CPU ---------------------------------------------------------------------
def _emulated_capture(fn, static_inputs, warmup):
    """What a CUDA graph does, on the CPU: the capture records one call on the static inputs; a replay reruns it on
    whatever the static inputs then hold and writes into the captured output tensors."""
    for _ in range(warmup):
        fn(*static_inputs)
    outputs = fn(*static_inputs)

    def replay() -> None:
        fresh = fn(*static_inputs)
        for old, new in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                            fresh if isinstance(fresh, tuple) else (fresh,)):
            old.copy_(new)
    return outputs, replay


def test_cuda_graph_callable_copies_inputs_keys_signatures_and_clones_outputs() -> None:
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return x * 2 + y, x.sum(dim=-1)

    graphed = CudaGraphCallable(fn, clone_outputs=True, warmup=1, _capture=_emulated_capture)
    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    first = graphed(x, y)
    torch.testing.assert_close(first[0], x * 2 + y)
    second = graphed(x + 1, y)  # same signature: replay on the copied inputs
    assert graphed.num_graphs == 1
    torch.testing.assert_close(second[0], (x + 1) * 2 + y)
    torch.testing.assert_close(first[0], x * 2 + y)  # cloned: the replay did not overwrite it
    graphed(torch.ones(4, 3), torch.ones(4, 3))  # a new batch size is a new graph
    assert graphed.num_graphs == 2
    shared = CudaGraphCallable(fn, clone_outputs=False, warmup=0, _capture=_emulated_capture)
    a = shared(x, y)[0]
    shared(x + 1, y)
    torch.testing.assert_close(a, (x + 1) * 2 + y)  # not cloned: the static output buffer was overwritten


def test_cuda_graph_callable_recaptures_when_the_weights_move() -> None:
    linear = torch.nn.Linear(3, 2)
    graphed = CudaGraphCallable(linear, anchor=linear.weight, _capture=_emulated_capture)
    graphed(torch.ones(1, 3))
    linear.weight.data = linear.weight.data.clone()  # new storage, as after module.to(device)
    graphed(torch.ones(1, 3))
    assert graphed.num_graphs == 1 and graphed._anchor_ptr == linear.weight.data_ptr()


def test_graphed_teacher_decode_gives_the_eager_tokens_emulated() -> None:
    """The LlamaGen decode step replayed from captured static buffers (caches and slot index by address, as a
    CUDA graph sees them) generates the eager tokens, across batch sizes, prefixes and repeated calls."""
    from dd.models.llamagen.fast import StaticDecoder

    spec, family, _ = build("gpt_test")
    labels, noise, uniforms = inputs(family, 3)
    sampler = samplers(spec)["teacher"]
    models = EvalModels(family)
    eager = sampler.sample(models, labels, noise, uniforms).sequence
    decoder = StaticDecoder(family.teacher, "eager")
    decoder._step = CudaGraphCallable(family.teacher.decode_step_static, clone_outputs=True,
                                      _capture=_emulated_capture)
    family._decoder = decoder
    for _ in range(2):
        torch.testing.assert_close(sampler.sample(models, labels, noise, uniforms).sequence, eager)
    torch.testing.assert_close(sampler.sample(models, labels[:1], noise[:1], uniforms[:1]).sequence, eager[:1])
    assert decoder._step.num_graphs == 2  # one per batch size (CFG doubles the rows), reused by later calls


# -- the static full-cache decode step -------------------------------------------------------------------------------
def test_static_decode_step_matches_the_prefix_decode_step() -> None:
    from dd.models.llamagen.fast import StaticDecoder

    _, family, _ = build("gpt_test")
    teacher = family.teacher
    labels = torch.tensor([0, 1, 2, 3])
    tokens = torch.randint(teacher.vocab_size, (4, teacher.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher.setup_caches(4, teacher.block_size + 1)
        teacher.prefill(labels)
        eager = [teacher.decode_step(tokens[:, p - 1], p) for p in range(1, teacher.block_size)]
        decoder = StaticDecoder(teacher, "eager")
        decoder.prepare(4)
        teacher.prefill(labels)
        static = [decoder(tokens[:, p - 1], p) for p in range(1, teacher.block_size)]
        full = teacher(labels, tokens[:, :-1])
    for p, (a, b) in enumerate(zip(eager, static), start=1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"slot {p}")
        torch.testing.assert_close(b, full[:, p], atol=1e-5, rtol=1e-5, msg=f"slot {p} vs teacher forcing")
    assert teacher.cache_positions.shape[0] % 8 == 0 and teacher.cache_positions.shape[0] > teacher.block_size


# -- torch.compile, every sampler, both families ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_teacher_and_student_give_the_eager_tokens(preset: str, fast_compile: None) -> None:
    spec, family, student = build(preset)
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 3)
    eager = sample_all(models, spec, labels, noise, uniforms)
    set_fast_path(models, "compile")
    assert_same_tokens(sample_all(models, spec, labels, noise, uniforms), eager)
    assert_same_tokens(sample_all(models, spec, labels, noise, uniforms), eager)  # reused programs and caches
    small = {k: v[:2] for k, v in eager.items()}
    assert_same_tokens(sample_all(models, spec, labels[:2], noise[:2], uniforms[:2]), small)  # another batch size


def test_compiled_decoder_under_bf16_autocast_matches_its_eager_formulation(fast_compile: None, capsys) -> None:
    """Under autocast the static decoder keeps its KV cache in bf16 (the values already are bf16: eager's fp32 cache
    holds the same numbers), and the compiled step gives the tokens of the uncompiled static step. Against dd's eager
    prefix step the bf16 logits differ by rounding (the full-cache attention reduces over more, masked, keys), so
    the tokens only mostly agree in bf16 (reported); in fp32 they are equal (tests above)."""
    from dd.models.llamagen.fast import StaticDecoder

    spec, family, _ = build("gpt_test")
    family.teacher_dtype = torch.bfloat16
    labels, noise, uniforms = inputs(family, 8)
    sampler, models = samplers(spec)["teacher"], EvalModels(family)
    prefix_step = sampler.sample(models, labels, noise, uniforms).sequence
    family._decoder = StaticDecoder(family.teacher, "eager")  # the uncompiled static step
    static = sampler.sample(models, labels, noise, uniforms).sequence
    family.set_fast_path("compile")
    torch.testing.assert_close(sampler.sample(models, labels, noise, uniforms).sequence, static)
    assert family.teacher.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    codebook = family.codebook()
    agreement = float((nearest_code_indices(static, codebook) == nearest_code_indices(prefix_step, codebook))
                      .float().mean())
    with capsys.disabled():
        print(f"\ngpt_test bf16 teacher tokens, static full-cache step vs eager prefix step: agreement {agreement:.3f}")


def test_compiled_decode_step_and_trunks_capture_without_graph_breaks(fast_compile: None) -> None:
    """fullgraph=True turns any graph break into an error: the captured units read nothing on the host."""
    from dd.acceleration import CompileOptions, compile_callable

    options = CompileOptions(fullgraph=True)
    _, family, student = build("gpt_test")
    teacher = family.teacher
    with torch.no_grad():
        teacher.setup_caches(2, teacher.block_size + 1)
        teacher.prefill(torch.tensor([0, 1]))
        step = compile_callable(teacher.decode_step_static, "cpu", options)
        for p in (1, 2, 3):
            step(torch.tensor([5, 6]), torch.tensor([p]))
        x = torch.randn(2, student.block_size, student.codebook_dim)
        compile_callable(student._fast_target, "cpu", options)(x, torch.tensor([0, 1]), torch.tensor([0, 3]))
        _, _, var_student = build("var_test")
        given = torch.zeros(2, var_student.token_length, dtype=torch.bool)
        x = torch.randn(2, var_student.token_length, var_student.z_channels)
        compile_callable(var_student._fast_target, "cpu", options)(x, torch.tensor([0, 1]), given)


def test_students_fall_back_to_eager_while_training() -> None:
    _, _, student = build("gpt_test")
    student.set_fast_path("compile")
    student.train()
    x = torch.randn(1, student.block_size, student.codebook_dim)
    tokens, _ = student.final_predict(x, torch.tensor([0]), 0)  # eager: gradients flow, nothing compiled
    assert tokens.requires_grad


# -- flow map ---------------------------------------------------------------------------------------------------------
def _flow_case(rows: tuple[int, ...], vocab: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.nn.functional.normalize(torch.randn(vocab, dim, generator=generator), dim=-1)
    logits = 3.0 * torch.randn(*rows, vocab, generator=generator)
    logits[..., : vocab // 4] = float("-inf")  # filtered tokens, as after top-k
    return torch.randn(*rows, dim, generator=generator), torch.log_softmax(logits, dim=-1), codebook


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler", "heun"])
def test_compiled_flow_map_gives_the_eager_tokens(solver: str, fast_compile: None) -> None:
    """One compiled program per position batch (B,) and per VAR-like scale batch (B, n); a changing row count
    compiles once more (dynamic) and then reuses it."""
    config = FlowMapConfig(solver=solver, num_steps=12)
    for rows in ((4,), (2, 9), (3, 16), (2, 4)):
        noise, log_probs, codebook = _flow_case(rows, 64, 8, seed=len(rows) + rows[-1])
        eager = map_noise_to_tokens(noise, log_probs, codebook, config)
        fast = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, fast_path="compile"))
        assert torch.equal(fast.indices, eager.indices)
        torch.testing.assert_close(fast.endpoint, eager.endpoint, atol=1e-5, rtol=1e-5)


def test_flow_map_chunks_and_vocab_streaming_compile_too(fast_compile: None) -> None:
    noise, log_probs, codebook = _flow_case((5, 7), 96, 8, seed=3)
    config = FlowMapConfig(num_steps=6, chunk_size=8, vocab_chunk_size=40)
    eager = map_noise_to_tokens(noise, log_probs, codebook, config)
    fast = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, fast_path="compile"))
    assert torch.equal(fast.indices, eager.indices)
    torch.testing.assert_close(fast.endpoint, eager.endpoint, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [8, 32])
def test_compiled_support_restricted_flow_map_gives_the_eager_tokens(dim: int, fast_compile: None) -> None:
    """The compiled solve takes both support-restricted forms too (8-d: gathered, 32-d: shared; ``support="auto"``
    compacts supports <= V/4 in both); the support width changes from call to call: one more compile (dynamic),
    then reused."""
    for rows, keep in (((4,), 8), ((2, 9), 12), ((3, 16), 5), ((2, 4), 16)):
        noise, log_probs, codebook = _flow_case(rows, 64, dim, seed=rows[-1] + keep)
        kth = log_probs.topk(keep, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, float("-inf"))  # top-k (normalisation is irrelevant)
        config = FlowMapConfig(num_steps=12)
        dense = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, support="dense"))
        eager = map_noise_to_tokens(noise, log_probs, codebook, config)
        fast = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, fast_path="compile"))
        assert torch.equal(eager.indices, dense.indices) and torch.equal(fast.indices, eager.indices)
        torch.testing.assert_close(fast.endpoint, eager.endpoint, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_pairs_with_every_cpu_fast_path_are_the_eager_pairs(preset: str, fast_compile: None) -> None:
    """Pair generation end to end: compiled teacher decode and compiled flow map give the eager pairs."""
    spec, family, _ = build(preset)
    seeds = sample_seeds(0, 0, 3)
    labels = per_sample_labels(seeds, family.num_classes)
    flow = FlowMapConfig(num_steps=20)
    eager = generate_pair_batch(family, seeds, labels, spec.sampling, flow)
    family.set_fast_path("compile")
    fast = generate_pair_batch(family, seeds, labels, spec.sampling, dataclasses.replace(flow, fast_path="compile"))
    assert torch.equal(fast.indices, eager.indices)
    torch.testing.assert_close(fast.max_snap_residual, eager.max_snap_residual, atol=1e-5, rtol=1e-4)


# -- precision ----------------------------------------------------------------------------------------------------------
def test_flow_map_and_code_snapping_ignore_a_callers_bf16_autocast() -> None:
    """Under bf16 autocast (hardware=gpu's bf16-mixed wraps pair generation and evaluation) the flow map and the
    nearest-code search keep their own precision: identical results (before, the solve failed with a dtype error
    and the snapping ran its distance matmul in bf16)."""
    noise, log_probs, codebook = _flow_case((6, 5), 256, 32, seed=1)
    reference = map_noise_to_tokens(noise, log_probs, codebook, FlowMapConfig(num_steps=30))
    points = codebook[torch.arange(40) % 256] + 1e-3 * torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    nearest = nearest_code_indices(points, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mapped = map_noise_to_tokens(noise, log_probs, codebook, FlowMapConfig(num_steps=30))
        snapped = nearest_code_indices(points, codebook)
    assert torch.equal(mapped.indices, reference.indices) and torch.equal(mapped.endpoint, reference.endpoint)
    assert torch.equal(snapped, nearest)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_runs_and_mostly_agrees_with_fp32(preset: str, record_property, capsys) -> None:
    """Teacher under ``teacher_dtype=bfloat16``, student under ``set_fast_path(..., dtype="bfloat16")``: both run
    and give valid tokens. Agreement with fp32 is reported, not asserted (an AR teacher diverges for good at its first
    flipped token; random-weight test models have flat distributions)."""
    spec, family, student = build(preset)
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 8)
    fp32 = sample_all(models, spec, labels, noise, uniforms)
    family.teacher_dtype = torch.bfloat16
    student.set_fast_path("eager", dtype="bfloat16")
    bf16 = sample_all(models, spec, labels, noise, uniforms)
    vocab = family.codebook().shape[0]
    agreement = {}
    for name in samplers(spec):
        assert bf16[name].shape == fp32[name].shape and int(bf16[name].max()) < vocab
        assert torch.isfinite(bf16[name + "/sequence"]).all()
        agreement[name] = float((bf16[name] == fp32[name]).float().mean())
        record_property(f"bf16_agreement_{name}", agreement[name])
    with capsys.disabled():
        print(f"\n{preset} bf16-vs-fp32 token agreement: "
              + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))


# -- Inductor (slow on a CPU) -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_inductor_compiled_paths_give_the_eager_tokens(preset: str, inductor: None) -> None:
    spec, family, student = build(preset)
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 3)
    eager = sample_all(models, spec, labels, noise, uniforms)
    set_fast_path(models, "compile")
    assert_same_tokens(sample_all(models, spec, labels, noise, uniforms), eager, atol=1e-4)


@pytest.mark.slow
def test_inductor_compiled_flow_map_gives_the_eager_tokens(inductor: None) -> None:
    noise, log_probs, codebook = _flow_case((4, 6), 128, 8, seed=5)
    config = FlowMapConfig(num_steps=10)
    eager = map_noise_to_tokens(noise, log_probs, codebook, config)
    fast = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, fast_path="compile"))
    assert torch.equal(fast.indices, eager.indices)
    torch.testing.assert_close(fast.endpoint, eager.endpoint, atol=1e-4, rtol=1e-4)


# -- CUDA (scripts/device_check.sh): CUDA graphs first, the slower reduce-overhead compiles last ------------------------
def _gpu_samplers_match_eager(preset: str, fast_path: str) -> None:
    spec, family, student = build(preset, "cuda")
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 3, "cuda")
    eager = sample_all(models, spec, labels, noise, uniforms)
    set_fast_path(models, fast_path)
    for _ in range(2):
        assert_same_tokens(sample_all(models, spec, labels, noise, uniforms), eager, atol=1e-4)
    small = {k: v[:1] for k, v in eager.items()}
    assert_same_tokens(sample_all(models, spec, labels[:1], noise[:1], uniforms[:1]), small, atol=1e-4)


def _gpu_flow_map_matches_eager(fast_path: str, num_steps: int) -> None:
    config = FlowMapConfig(num_steps=num_steps)
    for rows in ((4,), (2, 16), (2, 16), (3, 9)):
        noise, log_probs, codebook = (t.cuda() for t in _flow_case(rows, 4096, 32, seed=rows[-1]))
        eager = map_noise_to_tokens(noise, log_probs, codebook, config)
        fast = map_noise_to_tokens(noise, log_probs, codebook, dataclasses.replace(config, fast_path=fast_path))
        assert torch.equal(fast.indices, eager.indices)
        torch.testing.assert_close(fast.endpoint, eager.endpoint, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_cuda_graph_teacher_and_student_give_the_eager_tokens(preset: str) -> None:
    """Real CUDA graphs of the teacher decode step and the student trunk: every sampler, reuse, another batch."""
    _gpu_samplers_match_eager(preset, "cuda_graph")


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_flow_map_gives_the_eager_tokens() -> None:
    _gpu_flow_map_matches_eager("cuda_graph", 100)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_pairs_with_graphed_teacher_and_flow_map_are_the_eager_pairs(preset: str) -> None:
    spec, family, _ = build(preset, "cuda")
    seeds = sample_seeds(0, 0, 3)
    labels = per_sample_labels(seeds, family.num_classes)
    flow = FlowMapConfig(num_steps=50)
    eager = generate_pair_batch(family, seeds, labels, spec.sampling, flow, "cuda")
    family.set_fast_path("cuda_graph")
    fast = generate_pair_batch(family, seeds, labels, spec.sampling, dataclasses.replace(flow, fast_path="cuda_graph"),
                               "cuda")
    assert torch.equal(fast.indices, eager.indices)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_graphed_bf16_replays_repeat_the_first_calls_tokens(preset: str) -> None:
    """Graphs captured under bf16 autocast record their weight casts, so every replay (also after another batch
    size's capture, which frees and reuses memory) gives the first call's tokens. Capturing with autocast's weight
    cache on read cached bf16 copies that the outermost autocast frees on exit."""
    spec, family, student = build(preset, "cuda")
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 4, "cuda")
    family.teacher_dtype = torch.bfloat16
    set_fast_path(models, "cuda_graph", dtype="bfloat16")
    # the first call captures and replays while its autocast is still open; the later replays (after the batch-1
    # capture in between) ran on freed weight copies when the capture used autocast's cache
    first = sample_all(models, spec, labels, noise, uniforms)
    sample_all(models, spec, labels[:1], noise[:1], uniforms[:1])  # batch 1: its own captures (bf16 rounding may
    for _ in range(2):                                             # differ with the batch, so not compared)
        assert_same_tokens(sample_all(models, spec, labels, noise, uniforms), first, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_bf16_runs_on_the_fast_paths(preset: str, capsys) -> None:
    spec, family, student = build(preset, "cuda")
    models = EvalModels(family, student)
    labels, noise, uniforms = inputs(family, 8, "cuda")
    fp32 = sample_all(models, spec, labels, noise, uniforms)
    family.teacher_dtype = torch.bfloat16
    set_fast_path(models, "cuda_graph", dtype="bfloat16")
    bf16 = sample_all(models, spec, labels, noise, uniforms)
    agreement = {name: float((bf16[name] == fp32[name]).float().mean()) for name in samplers(spec)}
    with capsys.disabled():
        print(f"\n{preset} CUDA bf16 (cuda_graph) vs fp32 token agreement: "
              + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    assert all(torch.isfinite(bf16[name + "/sequence"]).all() for name in samplers(spec))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_reduce_overhead_compile_gives_the_eager_tokens(preset: str, inductor: None) -> None:
    """torch.compile(mode="reduce-overhead"): Inductor kernels replayed from CUDA-graph trees."""
    _gpu_samplers_match_eager(preset, "compile")


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_flow_map_gives_the_eager_tokens(inductor: None) -> None:
    _gpu_flow_map_matches_eager("compile", 16)  # the unrolled 100-step loop takes minutes to compile


# -- configuration: eval.yaml / generate_pairs.yaml ------------------------------------------------------------------
def _compose(name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


def test_configs_default_to_the_eager_paths() -> None:
    eval_cfg, pairs_cfg = _compose("eval", []), _compose("generate_pairs", [])
    assert eval_cfg["fast_path"] == "eager" and eval_cfg["student_dtype"] is None
    assert pairs_cfg["fast_path"] == "eager" and pairs_cfg["flow"]["fast_path"] == "eager"
    assert FlowMapConfig(**pairs_cfg["flow"]) == FlowMapConfig()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_impossible_fast_path_settings_fail_before_any_model_is_loaded(tmp_path) -> None:
    from dd import eval as dd_eval
    from dd import generate_pairs
    from dd.runs import ConfigError

    base = ["model=gpt_test", "student.checkpoint=random:0", f"output_dir={tmp_path}"]
    for overrides, message in ((["fast_path=cuda_graph"], "fast_path: fast_path='cuda_graph' .* trainer.accelerator=cpu"),
                               (["fast_path=jit"], "fast_path: fast_path='jit'"),
                               (["student_dtype=int8"], "student_dtype='int8'")):
        with pytest.raises(ConfigError, match=message):
            dd_eval.validate(_compose("eval", base + overrides))
    for overrides, message in ((["flow.fast_path=cuda_graph"], "flow: FlowMapConfig.fast_path='cuda_graph' captures"),
                               (["fast_path=cuda_graph"], "fast_path: .*trainer.accelerator=cpu")):
        with pytest.raises(ConfigError, match=message):
            generate_pairs._validate(_compose("generate_pairs", [f"output_dir={tmp_path}", *overrides]))


def test_pair_directories_resume_across_flow_fast_paths() -> None:
    """The flow map's fast path is execution only: a run may resume an eager run's directory with it."""
    from dd.pairs.shards import PairFormatError, check_settings_match

    existing = {"flow": dataclasses.asdict(FlowMapConfig()), "seed_base": 0}
    del existing["flow"]["fast_path"]  # manifests written before the setting existed
    check_settings_match(existing, {"flow": dataclasses.asdict(FlowMapConfig(fast_path="compile")), "seed_base": 0})
    with pytest.raises(PairFormatError, match="flow"):
        check_settings_match(existing, {"flow": dataclasses.asdict(FlowMapConfig(num_steps=50)), "seed_base": 0})


def test_eval_with_the_compiled_fast_path_writes_the_eager_samples(tmp_path, fast_compile: None) -> None:
    """dd.eval end to end (teacher-involved: teacher decode and student forwards) with fast_path=compile and
    the bf16 student knob recorded; the compiled run's samples equal the eager run's."""
    import numpy as np

    from dd import eval as dd_eval

    def run(name: str, extra: list[str]) -> dict:
        cfg = _compose("eval", ["model=gpt_test", "sampler=teacher_involved", "teacher_start_t=5", "num_samples=4",
                                "batch_size=2", "student.checkpoint=random:0", "metrics.enabled=false",
                                "write_images=false", f"output_dir={tmp_path / name}", *extra])
        return dd_eval.run(cfg)

    eager, fast = run("eager", []), run("fast", ["fast_path=compile"])
    assert eager["fast_path"] == "eager" and fast["fast_path"] == "compile" and fast["student_dtype"] is None
    samples = [np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("eager", "fast")]
    assert np.array_equal(samples[0], samples[1])


def test_generate_pairs_with_compiled_paths_resumes_an_eager_run_with_the_same_pairs(tmp_path,
                                                                                     fast_compile: None) -> None:
    from dd import generate_pairs
    from dd.pairs.shards import shard_path

    def run(out, extra: list[str], num_pairs: int) -> dict:
        return generate_pairs.run(_compose("generate_pairs", [
            "model=gpt_test", f"num_pairs={num_pairs}", "shard_size=4", "batch_size=4", "flow.num_steps=12",
            f"output_dir={out}", *extra]))

    run(tmp_path / "eager", [], 8)
    run(tmp_path / "mixed", [], 8)
    shard_path(tmp_path / "mixed" / "pairs", 1).unlink()  # regenerated by the compiled resume below
    manifest = run(tmp_path / "mixed", ["fast_path=compile", "flow.fast_path=compile"], 8)
    assert manifest["complete"]
    for index in (0, 1):
        eager = torch.load(shard_path(tmp_path / "eager" / "pairs", index), weights_only=True)
        mixed = torch.load(shard_path(tmp_path / "mixed" / "pairs", index), weights_only=True)
        assert torch.equal(eager["indices"], mixed["indices"])


# -- benchmarks -------------------------------------------------------------------------------------------------------
def _load_script(name: str, monkeypatch: pytest.MonkeyPatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_times_eager_and_fast_paths_side_by_side(tmp_path, monkeypatch, fast_compile: None) -> None:
    import sys

    bench = _load_script("bench_speed", monkeypatch)
    out = tmp_path / "speed.md"
    monkeypatch.setattr(sys, "argv", ["bench_speed.py", "--device", "cpu", "--sizes", "gpt_test,var_test",
                                      "--batches", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                      "--fast-paths", "eager,compile", "--out", str(out)])
    bench.main()
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert "| eager s/img | compile s/img | compile / eager |" in header
    assert "speed-up compile vs eager teacher" in header and "speed-up compile vs compile teacher" in header
    rows = [line for line in text.splitlines() if line.startswith(("| gpt_test", "| var_test"))]
    assert len(rows) == 8 and all(line.count("|") == header.count("|") for line in rows)
    assert "### Goals at batch 1" in text and "gpt_test, batch 1, compile: teacher" in text


def test_pairs_benchmark_times_flow_fast_paths(tmp_path, monkeypatch, fast_compile: None) -> None:
    import sys

    bench = _load_script("bench_pairs", monkeypatch)
    out = tmp_path / "pairs.md"
    monkeypatch.setattr(sys, "argv", ["bench_pairs.py", "--preset", "var_test", "--batch", "2", "--repeats", "1",
                                      "--fast-paths", "eager,compile", "--flow-fast-paths", "eager,compile",
                                      "--settings", "dpmpp_2m:10", "--out", str(out)])
    bench.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| eager", "| compile"))]
    assert len(rows) == 6 and rows[2].startswith("| eager | dpmpp_2m 10 steps (uniform) [flow compile] |")


def test_pairs_benchmark_times_dense_and_support_restricted_flow_maps(tmp_path, monkeypatch) -> None:
    import sys

    bench = _load_script("bench_pairs", monkeypatch)
    out = tmp_path / "pairs.md"
    monkeypatch.setattr(sys, "argv", ["bench_pairs.py", "--preset", "gpt_test", "--batch", "2", "--repeats", "1",
                                      "--top-k", "8", "--settings", "dpmpp_2m:4", "--supports", "dense,auto",
                                      "--out", str(out)])
    bench.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| eager")]
    assert [row.split(" | ")[1] for row in rows] == [
        "multinomial", "dpmpp_2m 4 steps (uniform) [support dense]", "dpmpp_2m 4 steps (uniform) [support auto]"]
    assert "top-k 8," in out.read_text()


# -- scripts/device_check.sh ---------------------------------------------------------------------------------------------
def test_device_check_script_parses_and_documents_itself() -> None:
    import subprocess

    script = REPO_ROOT / "scripts" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cpu" in usage and "device_check.md" in usage and "8 minutes" in usage


@pytest.mark.slow
def test_device_check_cpu_rehearsal_writes_one_report(tmp_path) -> None:
    """The whole script on the CPU with the tiny presets (about a minute on 2 cores): every stage ok, one report
    with the test summary, the side-by-side speed table and the pair tables."""
    import os
    import subprocess

    import sys

    # The interpreter running the tests (CI's venv lives outside the clone, so the script's .venv guess would miss it).
    env = {**os.environ, "DD_DEVICE_CHECK_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "device_check.sh"), str(tmp_path)], env=env, check=True,
                   capture_output=True, timeout=600)
    report = (tmp_path / "device_check.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.md", "device_check_logs.txt"]
    for stage in ("env", "tests", "speed", "pairs_1", "pairs_2"):
        assert f"| {stage} | ok |" in report, report
    assert " passed" in report and "| gpt_test | 1 | teacher | 16 |" in report and "| var_test | 2 | DD 1-step |" in report
    assert report.count("| compile | dpmpp_2m 20 steps (uniform) [flow compile] |") == 2
