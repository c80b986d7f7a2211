"""The reward-function contract, a name -> function registry, and weighted combination.

A reward function is any callable

    fn(prompts: Sequence[str], completions: Sequence[str], **example_fields) -> np.ndarray

returning one float per completion (shape ``[len(completions)]``). ``NaN`` means "could not score
this completion" (missing gold answer, verifier infrastructure error, ...), never "bad answer" --
a bad answer is a low score. Functions must accept and ignore example fields they do not use
(take ``**unused_fields``), so one batch dict can be splatted into every reward.

``prompts`` are always strings: a chat prompt (``data.fields.messages``) arrives as the content of its
last user turn, and the whole chat as the example field ``messages`` (a list of ``{"role", "content"}``
dicts; a plain prompt is the one user turn ``[{"role": "user", "content": prompt}]``). The other
fields are the examples' own (``answer``, ``tests``, ``response``, ...; ``None`` where one lacks it).

Rewards run on the host between sampling and ``make_experience``; they are plain Python/NumPy.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[..., np.ndarray]
NAN_POLICIES = ("zero", "raise", "propagate")

_REGISTRY: dict[str, RewardFn] = {}
# Built-in rewards by import path, loaded on first use: the registry imports nothing of theirs
# (and they import nothing of the registry), so rewards and data modules never import each other.
BUILTIN_REWARDS = {
    "math": "rlhfjax.rewards.math:math_reward_fn",
    "format": "rlhfjax.rewards.format:format_reward_fn",
    "length": "rlhfjax.rewards.format:length_penalty_fn",
    "code": "rlhfjax.rewards.sandbox:code_reward_fn",
    "gold_preference": "rlhfjax.data.labeler:gold_preference_reward",
}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
  """Registers ``fn`` under ``name`` so configs can refer to it; usable as a decorator."""

  def _register(f: RewardFn) -> RewardFn:
    taken = name in _REGISTRY and _REGISTRY[name] is not f
    if (taken or name in BUILTIN_REWARDS) and not overwrite:
      raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = f
    return f

  return _register(fn) if fn is not None else _register


def load_object(path: str):
  """The object at ``"package.module:attribute"``."""
  import importlib
  module, _, attr = path.partition(":")
  obj = importlib.import_module(module)
  for part in attr.split("."):
    obj = getattr(obj, part)
  return obj


def get_reward_fn(name: str) -> RewardFn:
  """The reward registered as ``name`` (``"math"``, ``"format"``, ``"code"``, ...) or at an import
  path ``"mypkg.rewards:brevity"``."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  path = BUILTIN_REWARDS.get(name, name if ":" in name else None)
  if path is None:
    raise KeyError(f"unknown reward {name!r}; registered: {list_reward_fns()}")
  try:
    fn = load_object(path)
  except (ImportError, AttributeError) as e:
    raise KeyError(f"reward {name!r}: cannot import {path!r} ({e})") from None
  if not callable(fn):
    raise KeyError(f"reward {name!r}: {path!r} is not callable")
  return fn


def list_reward_fns() -> list[str]:
  """Names of all registered reward functions."""
  return sorted(set(_REGISTRY) | set(BUILTIN_REWARDS))


def _normalize_specs(fns_with_weights) -> list[tuple[str, RewardFn, float]]:
  """Accepts {name: weight}, [(name_or_fn, weight)], or [(name, fn, weight)]."""
  items = list(fns_with_weights.items()) if isinstance(fns_with_weights, Mapping) else list(fns_with_weights)
  out: list[tuple[str, RewardFn, float]] = []
  seen: dict[str, int] = {}
  for item in items:
    if len(item) == 3:
      name, fn, weight = item
    elif len(item) == 2:
      spec, weight = item
      if isinstance(spec, str):
        name, fn = spec, get_reward_fn(spec)
      else:
        fn = spec
        name = getattr(spec, "__name__", type(spec).__name__)
    else:
      raise ValueError(f"expected (name_or_fn, weight) or (name, fn, weight), got {item!r}")
    if name in seen:  # Same function twice: keep both, log under distinct keys.
      seen[name] += 1
      name = f"{name}_{seen[name]}"
    else:
      seen[name] = 0
    out.append((name, fn, float(weight)))
  return out


def prompt_text(prompt) -> str:
  """A prompt as reward functions see it: the text itself, or a chat's last user turn (else last turn)."""
  if isinstance(prompt, str):
    return prompt
  turns = [m for m in prompt if m["role"] == "user"] or list(prompt)
  return turns[-1]["content"]


def as_chat(prompt) -> list[dict]:
  """A prompt as a chat: a plain prompt is one user turn."""
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def combine_rewards(
    fns_with_weights: Mapping[str, float] | Sequence[tuple[Any, ...]],
    prompts: Sequence[str | Sequence[dict]],
    completions: Sequence[str],
    nan_policy: str = "zero",
    **example_fields: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
  """Evaluates several reward functions on ``[batch]`` prompts/completions; their weighted sum.

  Args:
    fns_with_weights: ``{registered_name: weight}``, or a sequence of ``(name_or_fn, weight)`` or
      ``(name, fn, weight)``.
    nan_policy: what to do with NaN ("could not score") entries (an infinite score is one too), and
      with a reward function that raises or returns the wrong shape (counted as all-NaN):
      ``"zero"`` (default) -- contribute 0 to the total, counted in ``nan_counts``;
      ``"raise"`` -- raise ``ValueError`` (or re-raise the function's exception);
      ``"propagate"`` -- the total is NaN for that completion (let the caller drop or mask it).
    prompts: strings, or chats (lists of ``{"role", "content"}``): functions get ``prompt_text`` of
      each and, unless given in ``example_fields``, the chats as ``messages``.
    **example_fields: per-example fields (``answer=[...]``, ``tests=[...]``) passed to every function.

  Returns:
    ``(total, per_fn, nan_counts)``: ``total`` float32 ``[batch]``; ``per_fn[name]`` the raw,
    unweighted float32 ``[batch]`` scores with NaNs kept (log them with ``np.nanmean``);
    ``nan_counts[name]`` the number of NaN entries of each function.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
  n = len(completions)
  if len(prompts) != n:
    raise ValueError(f"{len(prompts)} prompts but {n} completions")
  example_fields.setdefault("messages", [as_chat(p) for p in prompts])
  prompts = [prompt_text(p) for p in prompts]
  total = np.zeros([n], np.float32)
  per_fn: dict[str, np.ndarray] = {}
  nan_counts: dict[str, int] = {}
  for name, fn, weight in _normalize_specs(fns_with_weights):
    try:
      scores = np.asarray(fn(prompts, completions, **example_fields), dtype=np.float32)
      if scores.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {scores.shape}, expected ({n},)")
    except Exception:
      if nan_policy == "raise":
        raise
      logging.exception("reward %r failed; scoring the whole batch as NaN", name)
      scores = np.full([n], np.nan, np.float32)
    if np.isinf(scores).any():  # +-inf (or a float64 beyond float32's range): no score, as NaN; it
      # would make every advantage of its group NaN (inf - inf)
      logging.warning("reward %r returned %d infinite scores; counted as unscored (NaN)", name,
                      int(np.isinf(scores).sum()))
      scores = np.where(np.isinf(scores), np.float32(np.nan), scores)
    nans = np.isnan(scores)
    nan_counts[name] = int(nans.sum())
    per_fn[name] = scores
    if nan_counts[name] and nan_policy == "raise":
      raise ValueError(f"reward {name!r} could not score {nan_counts[name]} of {n} completions")
    contrib = weight * (np.where(nans, 0.0, scores) if nan_policy == "zero" else scores)
    total = total + contrib.astype(np.float32)
  return total, per_fn, nan_counts
