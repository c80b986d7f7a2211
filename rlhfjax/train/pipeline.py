"""`train_and_evaluate(config, workdir)`: a run's shared setup, then its stages in order.

The shared setup (data, tokenizer, model config, mesh, metrics writer) becomes a `Run`; each stage of
`config.stages` is a `Stage` (`rlhfjax.train.stage`) the one driver `run_stage` runs. Every stage keeps
its own Orbax checkpoints in `<workdir>/checkpoints/<stage>` and is resumable: re-running the same
command continues a stage where its last checkpoint left it and skips a finished one; a stage whose
inputs come from an earlier stage that is not in `config.stages` restores them from that stage's
final checkpoint (`--config.stages=rl` on a workdir whose `sft` finished).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os

import ml_collections
import numpy as np

from rlhfjax.config import check_moved_keys, to_dataclass, to_json
from rlhfjax.metrics import primary_only
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import create_mesh
from rlhfjax.parallel.distributed import primary_first
from rlhfjax.train.stage import STAGES, Run, run_stage, stop_on_signals

log = logging.getLogger("rlhfjax")


def arithmetic_config(data: ml_collections.ConfigDict):
  from rlhfjax.data import ArithmeticConfig
  return ArithmeticConfig(ops=tuple(data.ops), min_digits=data.min_digits, max_digits=data.max_digits,
                          min_digits_b=data.get("min_digits_b", 0), max_digits_b=data.get("max_digits_b", 0),
                          thinking=data.thinking, thinking_prob=data.get("thinking_prob", 1.0),
                          flaw=data.flaw, flaw_prob=data.flaw_prob,
                          chatter=data.get("chatter", 0.0), repeat=data.get("repeat", 0.0))


def load_data(config, workdir):
  """Train and test examples: the arithmetic task family (TFDS array_record, built on first use),
  with `data.source="file"` the user's JSONL / Parquet files (`rlhfjax.data.files.load_file_data`),
  or with "code" the generated one-line Python tasks (`rlhfjax.data.code_tasks`)."""
  d = config.data
  if d.get("source", "arithmetic") == "file":
    from rlhfjax.data.files import load_file_data
    return load_file_data(d)
  if d.get("source", "arithmetic") == "code":
    from rlhfjax.data.code_tasks import generate_code_tasks
    kw = dict(flaw_prob=d.flaw_prob, test_fraction=d.test_fraction)
    return (generate_code_tasks(d.num_train, config.seed, "train", **kw),
            generate_code_tasks(d.num_test, config.seed, "test", **kw))
  if d.get("source", "arithmetic") != "arithmetic":
    raise ValueError(f"config.data.source must be 'arithmetic', 'file' or 'code', got {d.source!r}")
  import tensorflow_datasets as tfds
  from rlhfjax.data import builder_config_for, load_arithmetic
  tfds.disable_progress_bar()
  bc = builder_config_for(arithmetic_config(d), num_train=d.num_train, num_test=d.num_test,
                          seed=config.seed)
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing ..."
    train, test = load_arithmetic(data_dir, bc, "train"), load_arithmetic(data_dir, bc, "test")
  if len(train) == 0 or len(test) == 0:
    raise ValueError(f"empty dataset: {len(train)} train / {len(test)} test examples; "
                     "raise config.data.num_train / num_test")
  return train, test


def prepare_tokenizer(config, workdir, train_examples):
  """`tokenizer.path` (a sentencepiece .model, or a Hugging Face tokenizer.json / its directory),
  else `model.hf_path`'s tokenizer, else a sentencepiece model trained on the data into the workdir."""
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  t = config.tokenizer
  path = t.path or config.model.get("hf_path", "")
  chat = len(train_examples) > 0 and not isinstance(train_examples[0]["prompt"], str)
  if chat and (not path or path.endswith(".model")):
    raise ValueError("chat prompts (data.fields.messages) need a Hugging Face tokenizer with a chat "
                     "template: set tokenizer.path or model.hf_path")
  try:
    if path:
      from rlhfjax.hf_tokenizer import load_tokenizer
      if path.endswith(".model"):
        return load_tokenizer(path)
      return load_tokenizer(path, thinking=tuple(t.get("thinking", ("<think>", "</think>"))),
                            template_kwargs=dict(t.get("template_kwargs", {})) or None)
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
      train_tokenizer(template_texts(train_examples), path, vocab_size=t.vocab_size)
    return Tokenizer.load(path)
  except RuntimeError as e:  # sentencepiece / tokenizers on a damaged file
    raise ValueError(f"tokenizer {path} does not load ({' '.join(str(e).split())})") from None


def compute_options(cfg: TransformerConfig, model_section) -> TransformerConfig:
  """`cfg` (a checkpoint's architecture) with the experiment's how-to-compute settings from
  `config.model`: `remat`, `remat_policy` and `attention`."""
  return dataclasses.replace(cfg, remat=bool(model_section.get("remat", False)),
                             remat_policy=model_section.get("remat_policy", "full"),
                             attention=model_section.get("attention", "einsum"))


def make_model_config(config, tokenizer) -> TransformerConfig:
  """The policy's architecture: from `model.hf_path`'s config.json, else `config.model`."""
  max_len = config.data.max_prompt_len + config.data.max_response_len
  if config.model.get("hf_path"):
    from rlhfjax.models.hf import config_from_hf, read_hf_config, weight_files
    path = config.model.hf_path
    cfg = config_from_hf(read_hf_config(path), config.model.get("dtype", "float32"),
                         where=os.path.join(path, "config.json"))
    weight_files(path)  # all present, before any training
    cfg = compute_options(cfg, config.model)
    if tokenizer.vocab_size > cfg.vocab_size or max_len > cfg.max_len:
      raise ValueError(f"{path}: the model embeds {cfg.vocab_size} ids and {cfg.max_len} positions; the "
                       f"tokenizer has {tokenizer.vocab_size} ids and data.max_*_len sum to {max_len}")
    return cfg
  vocab = -(-tokenizer.vocab_size // 8) * 8  # pad the table to a multiple of 8 (ids above decode to unk)
  model = {k: v for k, v in config.model.items() if k != "hf_path"}
  return to_dataclass(TransformerConfig, model, vocab_size=vocab, max_len=max_len)


# The modules that define the stages (each registers its `Stage` class on import).
STAGE_MODULES = ("rlhfjax.train.sft", "rlhfjax.train.rm_stage", "rlhfjax.train.rl_stage",
                 "rlhfjax.train.ppo_stage", "rlhfjax.train.dpo_stage")


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
# model keys that say how to compute, not what: they may change on resume (and a workdir written
# before a key existed resumes)
COMPUTE_KEYS = ("model.remat", "model.remat_policy", "model.attention")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_config(config: ml_collections.ConfigDict, stages: list[str]) -> None:
  """Bad input that fails before any data is built: every cadence in the config (`log_every`,
  `checkpoint_every`, `keep_checkpoints` >= 1; other `*_every`, `steps`, `iterations` >= 0) and
  each stage's own sections (`Stage.check_config`: unknown keys, reward names, ...)."""
  for path, v in _flatten(config.to_dict()).items():
    key = path.rsplit(".", 1)[-1]
    least = 1 if key in ("log_every", "checkpoint_every", "keep_checkpoints") else \
        0 if key.endswith("_every") or key in ("steps", "iterations") else None
    if least is not None and isinstance(v, (int, float)) and v < least:
      raise ValueError(f"config.{path} must be >= {least}, got {v}")
  check_stage_order(stages)
  check_ranges(config, stages)
  for stage in stages:
    import_stages()[stage].check_config(config)


def check_stage_order(stages: list[str]) -> None:
  """Each stage once, and after the stages it builds on (sft before rm / dpo / rl / ppo, rm before ppo)."""
  repeated = sorted({s for s in stages if stages.count(s) > 1})
  if repeated:
    raise ValueError(f"config.stages={','.join(stages)} repeats {repeated}: name each stage once")
  order = {"sft": 0, "rm": 1, "dpo": 1, "rl": 2, "ppo": 2}
  for a, b in zip(stages, stages[1:]):
    if order.get(a, 0) > order.get(b, 0):
      raise ValueError(f"config.stages={','.join(stages)}: {b} must come before {a} (order: sft, rm|dpo, rl|ppo)")


def _least(config, section: str, keys: dict) -> None:
  for key, least in keys.items():
    if section in config and key in config[section]:
      v = config[section][key]
      if isinstance(v, (int, float)) and not isinstance(v, bool) and v < least:
        raise ValueError(f"config.{section}.{key} must be >= {least}, got {v}")


def check_ranges(config: ml_collections.ConfigDict, stages: list[str]) -> None:
  """Sizes and sampler settings that would otherwise fail (or train nothing) only once a stage runs."""
  _least(config, "data", {"max_prompt_len": 1, "max_response_len": 1, "num_train": 1, "num_test": 1})
  _least(config, "eval", {"batch_size": 1})
  for section in ("sft", "rm", "dpo"):
    _least(config, section, {"batch_size": 1, "learning_rate": 0, "warmup_steps": 0, "eval_examples": 0})
  from rlhfjax.sampling.sampler import check_filters
  if "eval" in config and "temperature" in config.eval:
    check_filters(config.eval.temperature, prefix="config.eval.")
  if "mesh" in config:
    import jax
    from rlhfjax.parallel.mesh import resolve_mesh_shape
    try:
      resolve_mesh_shape(tuple(config.mesh.shape), jax.device_count())
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)}: {e}") from None
  if not {"rl", "ppo"} & set(stages) or "rl_sampling" not in config:
    return
  _least(config, "rl_loop", {"prompts_per_iter": 1, "eval_examples": 0, "eval_samples": 0,
                             "max_unscored_iters": 0, "max_skipped_iters": 0})
  _least(config, "rl_sampling", {"max_new_tokens": 0})
  s = config.rl_sampling
  check_filters(s.temperature, s.top_k, s.top_p, prefix="config.rl_sampling.")
  if s.get("dtype", "") not in ("", "float32", "bfloat16"):
    raise ValueError(f"config.rl_sampling.dtype must be '', 'float32' or 'bfloat16', got {s.dtype!r}")
  share = config.rl_loop.get("max_unscored_share", 0.5)
  if not 0 <= share <= 1:
    raise ValueError(f"config.rl_loop.max_unscored_share must be in [0, 1], got {share}")


def _bound(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint (only then does its config.json bind a resume)."""
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(d.isdigit() for s in os.listdir(root)
                                     if os.path.isdir(os.path.join(root, s))
                                     for d in os.listdir(os.path.join(root, s)))


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir resumes only the run it holds: a one-line error if model/data/tokenizer changed
  once a checkpoint exists. Before that (a run that failed early) the new config replaces the old,
  and a tokenizer trained for another tokenizer/data config is dropped."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = _flatten({k: v for k, v in json.load(f).items() if k in SHAPE_SECTIONS})
  new = _flatten({k: v for k, v in json.loads(to_json(config)).items() if k in SHAPE_SECTIONS})
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in COMPUTE_KEYS)
  if diff and _bound(workdir):
    raise ValueError(f"workdir {workdir} holds a run with a different config ({', '.join(diff[:6])}"
                     f"{' ...' if len(diff) > 6 else ''} differ); use a new --workdir or delete it")
  stale = os.path.join(workdir, "tokenizer.model")
  if any(k.startswith(("tokenizer.", "data.")) for k in diff) and os.path.exists(stale):
    primary_only(os.remove)(stale)  # before process 0 trains the new one in `setup_run`


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)  # another process reading it sees the old file or the new


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The shared setup of a run in `workdir`: data, tokenizer, model config, mesh (no writer yet)."""
  with primary_first("setup_run"):  # process 0 builds the data set and tokenizer the others read
    train, test = load_data(config, workdir)
    tokenizer = prepare_tokenizer(config, workdir, train)
  if config.data.get("source", "arithmetic") == "file":  # the user's prompts: long ones fail now, not mid-run
    from rlhfjax.data.files import drop_long_prompts
    kw = dict(max_bad_fraction=config.data.get("max_bad_fraction", 0.0))
    train = drop_long_prompts(train, tokenizer, config.data.max_prompt_len, source="train data", **kw)
    test = drop_long_prompts(test, tokenizer, config.data.max_prompt_len, source="test data", **kw)
  return Run(config=config, workdir=workdir, tokenizer=tokenizer,
             model_cfg=make_model_config(config, tokenizer), mesh=create_mesh(tuple(config.mesh.shape)),
             rules=tuple(tuple(r) for r in config.sharding.rules), writer=None,
             train_examples=train, test_examples=test)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run `config.stages` in order in `workdir`; resumable. Returns {stage: results}."""
  from rlhfjax.metrics import MetricsWriter, plot_curves, read_metrics, write_report
  check_moved_keys(config)
  stages = stage_list(config)
  check_config(config, stages)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory")
  os.makedirs(workdir, exist_ok=True)
  check_resumable(config, workdir)  # every process reads; process 0 alone writes (atomically)
  primary_only(_write)(os.path.join(workdir, "config.json"), to_json(config))
  with stop_on_signals():  # SIGINT/SIGTERM: checkpoint at the next step boundary, then stop
    run = setup_run(config, workdir)
    run.writer = writer = MetricsWriter(workdir)
    try:
      for stage in stages:
        run.results[stage] = run_stage(run, STAGES[stage](run))
    finally:
      writer.close()
  primary_only(_write)(os.path.join(workdir, "results.json"), json.dumps(run.results, indent=2,
                                                                         default=float))
  # replot config.stages' curves (those of earlier stages outside it are kept as they were);
  # write_report links every plots/*.png
  ran = {r["stage"] for r in read_metrics(workdir)}
  plot_curves(workdir, [s for s in sorted(ran) if s in stages or s.split("_")[0] in stages])
  sections = {"Results": [dict(stage=s, **{k: v for k, v in r.items() if np.isscalar(v)})
                          for s, r in run.results.items()]}
  write_report(workdir, "rlhfjax run report", sections)
  return run.results
