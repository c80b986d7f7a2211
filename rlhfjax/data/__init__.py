"""Data: synthetic arithmetic task, TFDS array_record builder (no TensorFlow), user data files
(JSONL / Parquet with a field mapping, GSM8K answers), batching."""

from rlhfjax.data.arithmetic import (
    ArithmeticConfig,
    generate_problems,
    make_problem,
    parse_answer,
    teacher_accuracy,
)
from rlhfjax.data.batching import DataIterator, collate_prompts, collate_sft, encode_sequences
from rlhfjax.data.files import load_file_data, parse_gsm8k, read_examples, sample_path, split_examples
from rlhfjax.data.jsonl import iter_objects, read_jsonl
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
    "iter_objects",
    "load_arithmetic",
    "load_file_data",
    "make_problem",
    "parse_answer",
    "parse_gsm8k",
    "read_examples",
    "read_jsonl",
    "sample_path",
    "split_examples",
    "teacher_accuracy",
]
