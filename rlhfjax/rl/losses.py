"""Policy-gradient and value losses, and log-prob / entropy helpers on logits.

Losses return ``(loss, metrics)``; ``metrics`` is a flat dict of scalars (already under
``stop_gradient``) for logging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfjax.rl.kl import kl_estimate
from rlhfjax.rl.masked import masked_mean, masked_sum, masked_var

AGGREGATIONS = ("token", "sequence", "fixed")


def aggregate_loss(
    loss: jax.Array, mask: jax.Array, aggregation: str = "token", fixed_length: int | None = None
) -> jax.Array:
  """Reduces a per-token loss ``[batch, length]`` to a scalar.

  Args:
    loss: per-token loss ``[batch, length]``.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    aggregation: ``"token"``: sum over all masked tokens / number of masked tokens in the batch
      (DAPO, Yu et al. 2025, eq. 8); ``"sequence"``: mean over sequences of the per-sequence
      token mean (GRPO, Shao et al. 2024, eq. 3); sequences with no masked token are left out of
      the mean; ``"fixed"``: sum / (batch * fixed_length), a constant normalizer (Dr. GRPO,
      Liu et al. 2025).
    fixed_length: the constant length for ``"fixed"`` (e.g. the max response length).

  Returns:
    Scalar loss.
  """
  if aggregation == "token":
    return masked_mean(loss, mask)
  if aggregation == "sequence":
    per_seq = masked_mean(loss, mask, axis=-1)
    has_tokens = (jnp.sum(jnp.asarray(mask), axis=-1) > 0).astype(per_seq.dtype)
    return masked_mean(per_seq, has_tokens)
  if aggregation == "fixed":
    if fixed_length is None or fixed_length <= 0:
      raise ValueError(f"aggregation='fixed' needs a positive fixed_length, got {fixed_length}.")
    return masked_sum(loss, mask) / (loss.shape[0] * fixed_length)
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token",
    fixed_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped-surrogate policy loss of PPO.

  Per token, with ``r = exp(logprobs - old_logprobs)`` (Schulman et al. 2017, "Proximal Policy
  Optimization Algorithms", eq. 7, negated to a loss):

    L = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))

  ``clip_eps_high > clip_eps`` is DAPO's clip-higher (Yu et al. 2025, eq. 10). With ``dual_clip``
  (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5), tokens with
  ``A < 0`` have their loss capped at ``dual_clip * |A|``: ``L = min(L, -dual_clip * A)``.

  Args:
    logprobs: log-probs of the sampled tokens under the current policy ``[batch, length]``
      (the only argument gradients flow to).
    old_logprobs: log-probs under the behaviour policy that sampled them ``[batch, length]``.
    advantages: ``[batch, length]``.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    clip_eps: lower clip range epsilon (0.2 in the PPO paper); also the upper one by default.
    clip_eps_high: upper clip range (0.28 in DAPO); ``None`` means ``clip_eps``.
    dual_clip: constant ``c > 1`` of dual clip (3.0 in Ye et al.); ``None`` disables it.
    aggregation: ``"token"``, ``"sequence"`` or ``"fixed"``; see ``aggregate_loss``.
    fixed_length: the normalizing length for ``aggregation="fixed"``.

  Returns:
    ``(loss, metrics)``: scalar loss and a dict of scalars, all masked token means unless noted:
    ``pg_loss`` (the loss), ``clipfrac`` (fraction of tokens whose gradient is cut by either
    clip), ``dual_clipfrac``, ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio_mean``,
    ``ratio_max`` / ``ratio_min`` (over masked tokens; 0 if there are none).
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}.")
  clip_high = clip_eps if clip_eps_high is None else clip_eps_high
  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  advantages = jax.lax.stop_gradient(advantages)
  valid = jnp.asarray(mask) != 0

  log_ratio = logprobs - old_logprobs
  # Keep padded positions (often -inf log-probs) finite so nothing leaks into the gradients.
  log_ratio = jnp.where(valid, log_ratio, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_high)
  per_token = jnp.maximum(unclipped, clipped)
  is_clipped = clipped > unclipped
  is_dual_clipped = jnp.zeros_like(is_clipped)
  if dual_clip is not None:
    cap = -dual_clip * advantages
    is_dual_clipped = (advantages < 0) & (per_token > cap)
    per_token = jnp.where(is_dual_clipped, cap, per_token)
  loss = aggregate_loss(per_token, mask, aggregation, fixed_length)

  sg = jax.lax.stop_gradient
  ratio_sg = sg(ratio)
  any_valid = jnp.any(valid)
  metrics = {
      "pg_loss": sg(loss),
      "clipfrac": masked_mean((is_clipped | is_dual_clipped).astype(ratio.dtype), mask),
      "dual_clipfrac": masked_mean(is_dual_clipped.astype(ratio.dtype), mask),
      "approx_kl": masked_mean(kl_estimate(jnp.zeros_like(log_ratio), sg(log_ratio), "k3"), mask),
      "ratio_mean": masked_mean(ratio_sg, mask),
      "ratio_max": jnp.where(any_valid, jnp.max(jnp.where(valid, ratio_sg, -jnp.inf)), 0.0),
      "ratio_min": jnp.where(any_valid, jnp.min(jnp.where(valid, ratio_sg, jnp.inf)), 0.0),
  }
  return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip: float | None,
    aggregation: str = "token",
    fixed_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss of PPO (as in OpenAI baselines ``ppo2`` and lm-human-preferences).

    L = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -clip, clip) - R)^2)

  Args:
    values: current critic values ``[batch, length]`` (gradients flow here).
    old_values: critic values when the experience was collected ``[batch, length]``.
    returns: targets ``R`` (e.g. from ``gae``) ``[batch, length]``.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    clip: value clip range (0.2 in lm-human-preferences); ``None`` gives the plain
      ``0.5 * (V - R)^2``.
    aggregation: ``"token"``, ``"sequence"`` or ``"fixed"``; see ``aggregate_loss``.
    fixed_length: the normalizing length for ``aggregation="fixed"``.

  Returns:
    ``(loss, metrics)`` with ``vf_loss``, ``vf_clipfrac`` (fraction of masked tokens where the
    clipped term is the larger one), ``value_mean`` (masked mean of ``values``).
  """
  old_values = jax.lax.stop_gradient(old_values)
  returns = jax.lax.stop_gradient(returns)
  valid = jnp.asarray(mask) != 0
  values_v = jnp.where(valid, values, 0.0)
  unclipped = jnp.square(values_v - returns)
  if clip is None:
    per_token = unclipped
    is_clipped = jnp.zeros(unclipped.shape, bool)
  else:
    v_clipped = old_values + jnp.clip(values_v - old_values, -clip, clip)
    clipped = jnp.square(v_clipped - returns)
    per_token = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
  loss = 0.5 * aggregate_loss(per_token, mask, aggregation, fixed_length)
  sg = jax.lax.stop_gradient
  metrics = {
      "vf_loss": sg(loss),
      "vf_clipfrac": masked_mean(is_clipped.astype(loss.dtype), mask),
      "value_mean": masked_mean(sg(values_v), mask),
  }
  return loss, metrics


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of the variance of the returns that the critic explains, ``1 - Var[R - V] / Var[R]``.

  1 is a perfect critic, 0 is no better than a constant, negative is worse. Variances are over
  masked tokens; nan when ``Var[R] == 0`` (as in OpenAI baselines).

  Args:
    values: ``[batch, length]``.
    returns: ``[batch, length]``.
    mask: ``[batch, length]``.

  Returns:
    Scalar.
  """
  values = jax.lax.stop_gradient(values)
  var_r = masked_var(returns, mask)
  var_diff = masked_var(returns - values, mask)
  return jnp.where(var_r > 0, 1.0 - var_diff / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Log-probability of each token under a categorical over the last axis of ``logits``.

  Computed in float32 as ``log_softmax(logits)[token]``. This is the one token-log-prob function:
  the sampler-matching forward passes of the RL core and the SFT loss use it too.

  Args:
    logits: ``[batch, length, vocab]`` (any float dtype).
    tokens: ``[batch, length]`` integer ids.

  Returns:
    ``[batch, length]`` float32 log-probs.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy ``-sum_v p_v log p_v`` of the categorical over the last axis, in float32.

  Uses ``log_softmax`` for stability; vocabulary entries with ``-inf`` logits contribute 0.

  Args:
    logits: ``[batch, length, vocab]``.

  Returns:
    ``[batch, length]`` float32 entropies in nats.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
