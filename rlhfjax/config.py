"""Config plumbing: locked ml_collections ConfigDicts in, frozen dataclasses out.

Experiment files (`experiments/*.py`) build a `ConfigDict` with a comment on every field and lock it,
so `--config.sft.stepz=3` fails naming the valid keys. Before anything reaches `jax.jit`, a section is
turned into a frozen (hashable) dataclass with `to_dataclass`.
"""

from __future__ import annotations

import dataclasses
import json
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
  fixed = {}
  for f in dataclasses.fields(cls):
    if f.name in values:
      v = values[f.name]
      fixed[f.name] = tuple(v) if isinstance(v, list) else v
  return cls(**fixed)


def check_keys(config: ml_collections.ConfigDict, path: str, valid: set[str]) -> None:
  """Raise a one-line error if `config` (at `path`) has keys outside `valid`."""
  extra = sorted(set(config.keys()) - valid)
  if extra:
    raise ValueError(f"config.{path}: unknown key(s) {extra}; valid: {sorted(valid)}")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def get_field(config: ml_collections.ConfigDict, name: str, default: Any = None) -> Any:
  """`config.name` if present (locked configs raise on missing attributes)."""
  return config[name] if name in config else default
