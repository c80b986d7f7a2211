"""`train_and_evaluate(config, workdir)`: a run's shared setup, then its stages in order.

The shared setup (data, tokenizer, model config, mesh, metrics writer) becomes a `Run`; each stage of
`config.stages` is a `Stage` (`rlhfjax.train.stage`) the one driver `run_stage` runs. Every stage keeps
its own Orbax checkpoints in `<workdir>/checkpoints/<stage>` and is resumable: re-running the same
command continues a stage where its last checkpoint left it and skips a finished one; a stage whose
inputs come from an earlier stage that is not in `config.stages` restores them from that stage's
final checkpoint (`--config.stages=rl` on a workdir whose `sft` finished).
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np

from rlhfjax.config import check_moved_keys, to_dataclass, to_json
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import create_mesh
from rlhfjax.train.stage import STAGES, Run, run_stage

log = logging.getLogger("rlhfjax")


def arithmetic_config(data: ml_collections.ConfigDict):
  from rlhfjax.data import ArithmeticConfig
  return ArithmeticConfig(ops=tuple(data.ops), min_digits=data.min_digits, max_digits=data.max_digits,
                          thinking=data.thinking, flaw=data.flaw, flaw_prob=data.flaw_prob,
                          chatter=data.get("chatter", 0.0), repeat=data.get("repeat", 0.0))


def load_data(config, workdir):
  """Train and test examples of the arithmetic task family (TFDS array_record, built on first use)."""
  import tensorflow_datasets as tfds
  from rlhfjax.data import builder_config_for, load_arithmetic
  tfds.disable_progress_bar()
  d = config.data
  bc = builder_config_for(arithmetic_config(d), num_train=d.num_train, num_test=d.num_test,
                          seed=config.seed)
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  train, test = load_arithmetic(data_dir, bc, "train"), load_arithmetic(data_dir, bc, "test")
  if len(train) == 0 or len(test) == 0:
    raise ValueError(f"empty dataset: {len(train)} train / {len(test)} test examples; "
                     "raise config.data.num_train / num_test")
  return train, test


def prepare_tokenizer(config, workdir, train_examples):
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  if config.tokenizer.path:
    return Tokenizer.load(config.tokenizer.path)
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    train_tokenizer(template_texts(train_examples), path, vocab_size=config.tokenizer.vocab_size)
  return Tokenizer.load(path)


def make_model_config(config, tokenizer) -> TransformerConfig:
  vocab = -(-tokenizer.vocab_size // 8) * 8  # pad the table to a multiple of 8 (ids above decode to unk)
  return to_dataclass(TransformerConfig, config.model, vocab_size=vocab,
                      max_len=config.data.max_prompt_len + config.data.max_response_len)


# The modules that define the stages (each registers its `Stage` class on import).
STAGE_MODULES = ("rlhfjax.train.sft", "rlhfjax.train.rm_stage", "rlhfjax.train.rl_stage",
                 "rlhfjax.train.ppo_stage")


def import_stages() -> dict:
  import importlib
  for name in STAGE_MODULES:
    importlib.import_module(name)
  return STAGES


def stage_list(config) -> list[str]:
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  unknown = [s for s in stages if s not in import_stages()]
  if unknown or not stages:
    raise ValueError(f"config.stages: unknown stage(s) {unknown}; valid: {sorted(STAGES)}")
  return stages


# Sections whose change makes existing checkpoints / data / tokenizer in a workdir unusable.
SHAPE_SECTIONS = ("seed", "model", "tokenizer", "data")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir resumes only the run it holds: a one-line error if model/data/tokenizer changed."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  with open(path) as f:
    old = _flatten({k: v for k, v in json.load(f).items() if k in SHAPE_SECTIONS})
  new = _flatten({k: v for k, v in json.loads(to_json(config)).items() if k in SHAPE_SECTIONS})
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    raise ValueError(f"workdir {workdir} holds a run with a different config ({', '.join(diff[:6])}"
                     f"{' ...' if len(diff) > 6 else ''} differ); use a new --workdir or delete it")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run `config.stages` in order in `workdir`; resumable. Returns {stage: results}."""
  from rlhfjax.metrics import MetricsWriter, plot_curves, write_report
  check_moved_keys(config)
  stages = stage_list(config)
  os.makedirs(workdir, exist_ok=True)
  check_resumable(config, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(to_json(config))
  train, test = load_data(config, workdir)
  tokenizer = prepare_tokenizer(config, workdir, train)
  model_cfg = make_model_config(config, tokenizer)
  mesh = create_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.sharding.rules)
  writer = MetricsWriter(workdir)
  run = Run(config=config, workdir=workdir, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh,
            rules=rules, writer=writer, train_examples=train, test_examples=test)
  try:
    for stage in stages:
      run.results[stage] = run_stage(run, STAGES[stage](run))
  finally:
    writer.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(run.results, f, indent=2, default=float)
  plot_curves(workdir)  # write_report links every plots/*.png
  sections = {"Results": [dict(stage=s, **{k: v for k, v in r.items() if np.isscalar(v)})
                          for s, r in run.results.items()]}
  write_report(workdir, "rlhfjax run report", sections)
  return run.results
