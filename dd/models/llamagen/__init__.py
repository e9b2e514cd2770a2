"""LlamaGen family: VQ-16 tokenizer, class-conditional GPT teacher and its Distilled-Decoding student."""

from dd.models.llamagen.builders import (
    build_student,
    build_teacher,
    build_tokenizer,
    arch_from_official_args,
    load_weights,
    student_from_teacher,
)
from dd.models.llamagen.family import LlamaGenFamily
from dd.models.llamagen.generation import GenerationResult, generate
from dd.models.llamagen.gpt import LlamaGenGPT
from dd.models.llamagen.spec import LlamaGenSpec, make_spec, spec_from_config
from dd.models.llamagen.student import LlamaGenDDStudent
from dd.models.llamagen.tokenizer import VQTokenizer

__all__ = [
    "GenerationResult",
    "LlamaGenDDStudent",
    "LlamaGenFamily",
    "LlamaGenGPT",
    "LlamaGenSpec",
    "VQTokenizer",
    "arch_from_official_args",
    "build_student",
    "build_teacher",
    "build_tokenizer",
    "generate",
    "load_weights",
    "make_spec",
    "spec_from_config",
    "student_from_teacher",
]
