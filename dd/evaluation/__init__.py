"""Evaluation core (pure torch, no Lightning/Hydra): samplers behind one interface, seeded batches, output files,
quality metrics and the metrics.json report. The Lightning task is ``dd.tasks.eval_sampling``; the entry point
``dd.eval``."""

from dd.evaluation.batches import EvalBatch, sample_eval_batch
from dd.evaluation.samplers import (
    EvalModels,
    EvalSampler,
    FewStepSampler,
    SamplerOutput,
    TeacherInvolvedSampler,
    TeacherSampler,
)

__all__ = [
    "EvalBatch",
    "EvalModels",
    "EvalSampler",
    "FewStepSampler",
    "SamplerOutput",
    "TeacherInvolvedSampler",
    "TeacherSampler",
    "sample_eval_batch",
]
