"""Config plumbing: locked ml_collections ConfigDicts in, frozen dataclasses out.

Experiment files (`experiments/*.py`) build a locked `ConfigDict` with a comment on every field, so
`--config.sft.stepz=3` fails naming the valid keys; `to_dataclass` turns a section into a frozen
(hashable) dataclass before anything reaches `jax.jit`. `resolve_config_arg` turns an experiment name
(`--config=exceed_teacher`) into the path of its file; `import_sibling` is how an experiment file
loaded by path imports the one it extends.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import types
import zlib
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")


def to_dataclass(cls: type[T], section: ml_collections.ConfigDict | dict, **overrides) -> T:
  """Build frozen dataclass `cls` from a config section; unknown keys are an error naming valid ones."""
  values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  values.update(overrides)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid: {sorted(names)}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def get_field(config: ml_collections.ConfigDict, name: str, default: Any = None) -> Any:
  """`config.name` if present (locked configs raise on missing attributes)."""
  return config[name] if name in config else default


def experiments_dir() -> str:
  """The experiment files: the installed `rlhfjax.experiments` package (a wheel ships the repository's
  `experiments/` under that name), else `experiments/` beside the `rlhfjax` package (a checkout)."""
  try:
    spec = importlib.util.find_spec("rlhfjax.experiments")
  except ImportError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def available_experiments() -> list[str]:
  """Names `--config=NAME` accepts: the experiment files' names without `.py`."""
  d = experiments_dir()
  return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_")) \
      if os.path.isdir(d) else []


def resolve_config_arg(arg: str) -> str:
  """A `--config` value as `config_flags` takes it: `NAME[:ARG]` (no `/`, no `.py`) becomes the path of
  that experiment file (`:ARG` still goes to `get_config`); a path is returned as is once it exists.
  Raises ValueError naming the available experiments for an unknown name, FileNotFoundError for a
  missing path (both one line)."""
  path, sep, rest = arg.partition(":")
  if "/" in path or os.sep in path or path.endswith(".py"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file {path} not found")
    return arg
  names = available_experiments()
  if path not in names:
    raise ValueError(f"unknown experiment {path!r}; available: {', '.join(names) or 'none'} "
                     "(or a path to a config .py file)")
  return os.path.join(experiments_dir(), f"{path}.py") + sep + rest


def import_sibling(file: str, name: str) -> types.ModuleType:
  """Module `name` from `name.py` beside `file`, loaded once per path. For experiment files, which
  `config_flags` loads by path as top-level modules, so `from . import base` has no package."""
  path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
  key = f"_rlhfjax_experiment_{name}_{zlib.crc32(path.encode()):08x}"  # no dots: no parent package
  if key in sys.modules:
    return sys.modules[key]
  spec = importlib.util.spec_from_file_location(key, path)
  if spec is None or not os.path.isfile(path):
    raise ImportError(f"no experiment {name!r} beside {file} ({path} not found)")
  module = importlib.util.module_from_spec(spec)
  sys.modules[key] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[key]
    raise
  return module


# Keys that moved when `config.rl` was split by concern (algorithm / optimizer / sampler / loop).
MOVED_KEYS = {
    **{f"rl.{k}": f"rl_optim.{k}" for k in ("learning_rate", "value_learning_rate", "warmup_steps",
                                            "weight_decay", "grad_clip")},
    **{f"rl.{k}": f"rl_sampling.{k}" for k in ("temperature", "top_k", "top_p", "max_new_tokens")},
    **{f"rl.{k}": f"rl_loop.{k}" for k in ("iterations", "prompts_per_iter")},
}


def rewrite_moved_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """`--config.rl.iterations=5` -> `--config.rl_loop.iterations=5` (old keys keep working).

  Returns (new argv, one note per rewritten flag)."""
  out, notes = [], []
  for arg in argv:
    key, eq, value = arg.partition("=")
    old = key.removeprefix("--config.") if key.startswith("--config.") else None
    if old in MOVED_KEYS:
      notes.append(f"note: config.{old} is now config.{MOVED_KEYS[old]}")
      arg = f"--config.{MOVED_KEYS[old]}{eq}{value}"
    out.append(arg)
  return out, notes


def check_moved_keys(config: ml_collections.ConfigDict) -> None:
  """One line naming the new place of a key an (older) experiment file sets in its old place."""
  for old, new in MOVED_KEYS.items():
    section, key = old.split(".")
    if section in config and hasattr(config[section], "keys") and key in config[section]:
      raise ValueError(f"config.{old} moved to config.{new}")


def resolve_argv(argv: list[str]) -> list[str]:
  """`--config=NAME` -> `--config=<path of experiments/NAME.py>` (`resolve_config_arg`); a key
  that moved (`--config.rl.iterations`) is rewritten to its new place with a one-line note."""
  out, notes = rewrite_moved_flags(list(argv))
  for note in notes:
    print(note, file=sys.stderr)
  for i, a in enumerate(out):
    for prefix in ("--config=", "-config="):
      if a.startswith(prefix):
        out[i] = prefix + resolve_config_arg(a[len(prefix):])
    if a in ("--config", "-config") and i + 1 < len(out):
      out[i + 1] = resolve_config_arg(out[i + 1])
  return out


def parse_config(argv: list[str]) -> ml_collections.ConfigDict:
  """The locked config `python -m rlhfjax.main --config=... --config.a.b=v ...` would run (`argv`: only
  those flags), parsed by `config_flags` into a private FlagValues."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["rlhfjax", *resolve_argv(argv)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config
