"""VAR family: multi-scale VQVAE, class-conditional next-scale VAR teacher and its Distilled-Decoding student."""

from dd.models.var.builders import build_student, build_teacher, build_vqvae, load_weights, student_from_teacher
from dd.models.var.family import VARFamily
from dd.models.var.generation import VARGenerationResult, var_filter_logits, var_generate
from dd.models.var.spec import VARSpec, make_spec, spec_from_config
from dd.models.var.student import VARDDStudent
from dd.models.var.transformer import VARTransformer
from dd.models.var.vqvae import MultiScaleVQVAE

__all__ = [
    "MultiScaleVQVAE",
    "VARDDStudent",
    "VARFamily",
    "VARGenerationResult",
    "VARSpec",
    "VARTransformer",
    "build_student",
    "build_teacher",
    "build_vqvae",
    "load_weights",
    "make_spec",
    "spec_from_config",
    "student_from_teacher",
    "var_filter_logits",
    "var_generate",
]
