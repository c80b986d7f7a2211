"""Data: synthetic arithmetic task, TFDS array_record builder (no TensorFlow), JSONL reader, batching."""

from rlhfjax.data.arithmetic import (
    ArithmeticConfig,
    generate_problems,
    make_problem,
    parse_answer,
    teacher_accuracy,
)
from rlhfjax.data.batching import DataIterator, collate_prompts, collate_sft, encode_sequences
from rlhfjax.data.jsonl import read_jsonl
from rlhfjax.data.tfds_arithmetic import (
    BUILDER_CONFIGS,
    ArithmeticBuilder,
    ArithmeticBuilderConfig,
    builder_config_for,
    load_arithmetic,
)

__all__ = [
    "ArithmeticBuilder",
    "ArithmeticBuilderConfig",
    "ArithmeticConfig",
    "BUILDER_CONFIGS",
    "DataIterator",
    "builder_config_for",
    "collate_prompts",
    "collate_sft",
    "encode_sequences",
    "generate_problems",
    "load_arithmetic",
    "make_problem",
    "parse_answer",
    "read_jsonl",
    "teacher_accuracy",
]
