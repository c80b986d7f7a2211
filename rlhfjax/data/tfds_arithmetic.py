"""TFDS builder for the synthetic arithmetic task, stored as array_record and read without TensorFlow.

    builder = ArithmeticBuilder(data_dir=data_dir, config="add2_flawed")
    builder.download_and_prepare()
    ds = builder.as_data_source(split="train")   # random access, len(ds), ds[i] -> dict of bytes

or simply `load_arithmetic(data_dir, "add2_flawed", "train")`, which builds on first use and
returns records with Python `str` values.

Without TensorFlow (tensorflow-datasets 4.9.10), `Text()` and `np.bool_` features encode to
array_record and decode through `as_data_source` with NumPy only (strings as `bytes`, decoded by
`load_arithmetic`); `tf.data` paths (`as_dataset`, `tfds.load`) would need TF and are not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhfjax.data.arithmetic import ArithmeticConfig, generate_problems
from rlhfjax.data.records import RecordView

_STR_KEYS = ("prompt", "answer", "demonstration")


@dataclasses.dataclass
class ArithmeticBuilderConfig(tfds.core.BuilderConfig):
  """A named arithmetic variant and its split sizes."""

  arithmetic: ArithmeticConfig = ArithmeticConfig()
  num_train: int = 10_000  # train examples (sampled with replacement from the train questions)
  num_test: int = 1_000  # test examples (questions disjoint from train)
  seed: int = 0  # generation seed; the splits are a pure function of this config


def _named(name, description, **kw):
  sizes = {k: kw.pop(k) for k in ("num_train", "num_test", "seed") if k in kw}
  return ArithmeticBuilderConfig(name=name, description=description,
                                 arithmetic=ArithmeticConfig(**kw), **sizes)


BUILDER_CONFIGS = [
    _named("add2", "2-digit addition, correct teacher with scratchpad."),
    _named("add2_flawed", "2-digit addition; the teacher always forgets carries.",
           flaw="drop_carry", flaw_prob=1.0),
    _named("add3", "1-3 digit addition, correct teacher.", min_digits=1, max_digits=3),
    _named("add3_flawed", "1-3 digit addition; the teacher forgets carries.",
           min_digits=1, max_digits=3, flaw="drop_carry"),
    _named("mixed", "1-2 digit +, -, *; correct teacher.", ops=("+", "-", "*"), min_digits=1),
    _named("mixed_flawed", "1-2 digit +, -, *; the teacher forgets carries and borrows.",
           ops=("+", "-", "*"), min_digits=1, flaw="drop_carry"),
    _named("add2_nothink", "2-digit addition, answers without a scratchpad.", thinking=False),
]


class ArithmeticBuilder(tfds.core.GeneratorBasedBuilder):
  """Synthetic arithmetic problems with (possibly flawed) teacher demonstrations."""

  name = "rlhfjax_arithmetic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "add2"

  def __init__(self, *, data_dir: str, file_format: str = "array_record", **kwargs):
    super().__init__(data_dir=os.fspath(data_dir), file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(cfg.description or "") + " " + json.dumps(dataclasses.asdict(cfg.arithmetic)),
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "demonstration": tfds.features.Text(),
            "has_carry": np.bool_,
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples(cfg, "train", cfg.num_train),
        "test": self._generate_examples(cfg, "test", cfg.num_test),
    }

  def _generate_examples(self, cfg, split, n):
    yield from enumerate(generate_problems(cfg.arithmetic, n, cfg.seed, split))


def builder_config_for(arithmetic: ArithmeticConfig, *, num_train: int = 10_000,
                       num_test: int = 1_000, seed: int = 0) -> ArithmeticBuilderConfig:
  """A custom builder config named by a hash of its contents (so different configs never collide)."""
  blob = json.dumps([dataclasses.asdict(arithmetic), num_train, num_test, seed], sort_keys=True)
  name = "custom_" + hashlib.sha256(blob.encode()).hexdigest()[:12]
  return ArithmeticBuilderConfig(name=name, description="custom arithmetic config",
                                 arithmetic=arithmetic, num_train=num_train, num_test=num_test,
                                 seed=seed)


def load_arithmetic(data_dir: str, config: str | ArithmeticConfig | ArithmeticBuilderConfig,
                    split: str) -> Sequence[dict]:
  """`split` ("train", "test", or TFDS slicing like "train[:100]") as a random-access sequence of
  {prompt, answer, demonstration: str, has_carry: bool}, built into `data_dir` on first use.

  `config`: a `BUILDER_CONFIGS` name (another raises `ValueError`), an `ArithmeticConfig` (default
  sizes and seed) or an `ArithmeticBuilderConfig`.
  """
  if isinstance(config, ArithmeticConfig):
    config = builder_config_for(config)
  elif isinstance(config, str) and config not in {c.name for c in BUILDER_CONFIGS}:
    raise ValueError(f"unknown arithmetic config {config!r}; choose one of "
                     f"{[c.name for c in BUILDER_CONFIGS]} or pass an ArithmeticConfig")
  builder = ArithmeticBuilder(data_dir=os.path.expanduser(os.fspath(data_dir)), config=config)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return RecordView(builder.as_data_source(split=split))
