"""Scorers: what turns one RL iteration's rollout into one score per response.

    scorer(texts: list[str], examples: list[dict], rollout: Rollout) -> (scores [B] np.float32, metrics)

`verifier_scorer(spec)` weighs reward functions on the decoded text (math, format, code, user
functions; `rlhfjax.rewards.base`) on the host; `reward_model_scorer(params, model_cfg)` runs a
trained reward model (or ensemble) on the device rollout's `[prompt | response]` tokens; the reward
model's jitted scoring (`score`, `ensemble_score`, `score_batched`) is here too. `examples` are the
rows' prompt records (`prompt`, `answer`, `tests`, ...): reward functions get every field but `prompt`
as a keyword (`None` where a row lacks it), the prompt as text and the chat as `messages`
(`rlhfjax.rewards.base`). A NaN score means "could not score" (the RL loop's `nan_reward` decides
what happens to it).
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models.heads import RewardModel
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.transformer import TransformerConfig


class Scorer(Protocol):
  def __call__(self, texts: list[str], examples: list[dict], rollout) -> tuple[np.ndarray, dict]:
    ...


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  ok = ~np.isnan(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def _split_weight(part: str) -> tuple[str, float]:
  """"math:0.5" -> ("math", 0.5); "pkg.mod:fn" -> ("pkg.mod:fn", 1.0); "pkg.mod:fn:2" -> (.., 2.0)."""
  head, sep, tail = part.rpartition(":")
  if sep:
    try:
      return head, float(tail)
    except ValueError:
      pass
  return part, 1.0


def verifier_scorer(spec: str, nan_reward: str = "zero") -> Scorer:
  """Weighted verifier rewards from a spec like "math:1.0,format:0.1" (names from the registry).

  Each reward is logged separately (`reward_<name>`: mean over the completions it could score,
  `reward_nan_<name>`: how many it could not). With `nan_reward="mask"` the total is NaN where any
  reward is, for the loop to drop; "zero" counts an unscorable reward as 0.
  """
  from rlhfjax.rewards.base import combine_rewards, get_reward_fn
  weights = []
  for part in spec.split(","):
    if part.strip():
      name, w = _split_weight(part.strip())
      try:
        weights.append((name, get_reward_fn(name), w))  # resolved now: a typo fails before training
      except KeyError as e:
        raise ValueError(e.args[0]) from None
  policy = {"zero": "zero", "mask": "propagate", "raise": "raise"}[nan_reward]

  def score(texts, examples, rollout):
    del rollout
    keys = sorted({k for e in examples for k in e} - {"prompt"})
    total, per_fn, nan_counts = combine_rewards(weights, [e["prompt"] for e in examples], texts, nan_policy=policy,
                                                **{k: [e.get(k) for e in examples] for k in keys})
    metrics = {f"reward_{k}": _nanmean(v) for k, v in per_fn.items()}
    metrics.update({f"reward_nan_{k}": float(v) for k, v in nan_counts.items()})
    return np.asarray(total, np.float32), metrics
  return score


def reward_model_scorer(params, model_cfg: TransformerConfig, *, ensemble: bool = False,
                        uncertainty_coef: float = 1.0, pool: str = "last",
                        extra_metrics: Callable[[list[str], list[dict]], dict] | None = None) -> Scorer:
  """The reward model on the device rollout (`[prompt | response]`); for an ensemble the
  uncertainty-penalized `mean − λ·std` (and `rm_mean`, `rm_std` in the metrics).
  `extra_metrics(texts, examples)` adds host metrics (e.g. a simulated human's gold score)."""

  @jax.jit
  def device_score(params, prompt_ids, prompt_mask, response_ids, response_mask):
    tokens = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    if ensemble:
      out = ensemble_score(params, tokens, mask, uncertainty_coef, model_cfg=model_cfg, pool=pool)
      return out["penalized"], {"rm_mean": out["mean"].mean(), "rm_std": out["std"].mean()}
    return score(params, tokens, mask, model_cfg=model_cfg, pool=pool), {}

  def scorer(texts, examples, rollout):
    scores, extra = device_score(params, rollout.prompt_ids, rollout.prompt_mask,
                                 rollout.response_ids, rollout.response_mask)
    metrics = dict(extra_metrics(texts, examples)) if extra_metrics else {}
    metrics.update({k: float(v) for k, v in jax.device_get(extra).items()})
    return scores, metrics
  return scorer


def _forward(params, tokens, mask, model_cfg, pool):
  return RewardModel(model_cfg, pool).apply({"params": params}, tokens, positions_from_mask(mask), mask)


@functools.partial(jax.jit, static_argnames=("model_cfg", "pool"))
def score(params, tokens, mask, *, model_cfg: TransformerConfig, pool: str = "last"):
  """Normalized reward of each `[left-padded prompt | right-padded response]` sequence, read at its
  last real token: [B, T] tokens/mask -> [B] float32. Sharded inputs give sharded outputs (the batch
  axis stays where it is); `make_scorer` binds the config."""
  return _forward(params, tokens, mask, model_cfg, pool)


@functools.partial(jax.jit, static_argnames=("model_cfg", "pool"))
def ensemble_score(params, tokens, mask, uncertainty_coef=1.0, *, model_cfg: TransformerConfig,
                   pool: str = "last"):
  """Scores under N stacked members: {"mean", "std", "penalized" = mean − λ·std: [B], "members": [N, B]}."""
  s = jax.vmap(lambda p: _forward(p, tokens, mask, model_cfg, pool))(params)
  mean, std = s.mean(0), s.std(0)
  return {"mean": mean, "std": std, "penalized": mean - uncertainty_coef * std, "members": s}


def make_scorer(model_cfg: TransformerConfig, *, ensemble: bool = False, uncertainty_coef: float = 1.0,
                pool: str = "last"):
  """`score_fn(params, tokens, mask) -> [B]`; for ensembles the uncertainty-penalized mean.
  `pool` must be the one the model was trained with (`config.rm.pool`, also in the rm checkpoint meta)."""
  if ensemble:
    return lambda params, tokens, mask: ensemble_score(params, tokens, mask, uncertainty_coef,
                                                       model_cfg=model_cfg, pool=pool)["penalized"]
  return functools.partial(score, model_cfg=model_cfg, pool=pool)


def score_batched(params, tokens, mask, model_cfg, *, ensemble: bool = False, batch_size: int = 0,
                  pool: str = "last"):
  """Host helper: scores of many sequences in fixed-shape chunks -> NumPy [M] (or [N, M])."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  m = tokens.shape[0]
  bs = batch_size or m
  pad = -m % bs
  if pad:
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
  if ensemble:
    fn = lambda t, k: ensemble_score(  # noqa: E731
        params, t, k, model_cfg=model_cfg, pool=pool)["members"]
  else:
    fn = lambda t, k: score(params, t, k, model_cfg=model_cfg, pool=pool)  # noqa: E731
  out = [np.asarray(fn(tokens[i:i + bs], mask[i:i + bs])) for i in range(0, tokens.shape[0], bs)]
  return np.concatenate(out, axis=-1)[..., :m]
