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


def _f32(x: jax.Array) -> jax.Array:
  """``x`` in float32 or wider (bf16 ratios, squares and ``exp`` lose most of their digits)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def aggregate_loss(loss: jax.Array, mask: jax.Array, aggregation: str = "token",
                   fixed_length: int | None = None) -> jax.Array:
  """Reduces a per-token loss ``[batch, length]`` over ``mask`` to a scalar.

  ``"token"``: mean over all masked tokens of the batch (DAPO, Yu et al. 2025, eq. 8);
  ``"sequence"``: mean over non-empty sequences of their token means (GRPO, Shao et al. 2024,
  eq. 3); ``"fixed"``: sum / (batch * fixed_length), a constant normalizer (Dr. GRPO, Liu et al.
  2025; ``fixed_length`` must be positive).
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


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                    mask: jax.Array, *, clip_eps: float, clip_eps_high: float | None = None,
                    dual_clip: float | None = None, aggregation: str = "token",
                    fixed_length: int | None = None,
                    is_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7, negated), per token, then aggregated:

    L = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high)),   r = exp(logprobs - old_logprobs)

  All inputs ``[batch, length]``; gradients flow only to ``logprobs``. ``clip_eps_high`` (None =
  ``clip_eps``) above ``clip_eps`` is DAPO's clip-higher (Yu et al. 2025, eq. 10); ``dual_clip = c > 1``
  caps the loss of ``A < 0`` tokens at ``-c * A`` (Ye et al. 2020, eq. 5). ``aggregation``: see
  ``aggregate_loss``. Metrics (masked token means): ``pg_loss``, ``clipfrac`` (either clip cuts the
  gradient), ``dual_clipfrac``, ``approx_kl`` (k3 of KL(old || new)), ``ratio_mean``, and
  ``ratio_max`` / ``ratio_min`` (0 without masked tokens). ``is_weights`` ``[batch, length]``
  (no gradient; e.g. ``truncated_is_weights``) multiply each token's loss before aggregation.
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}.")
  clip_high = clip_eps if clip_eps_high is None else clip_eps_high
  logprobs = _f32(logprobs)
  old_logprobs = jax.lax.stop_gradient(_f32(old_logprobs))
  advantages = jax.lax.stop_gradient(_f32(advantages))
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
  if is_weights is not None:
    per_token = per_token * jax.lax.stop_gradient(is_weights)
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


def truncated_is_weights(trainer_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array,
                         cap: float) -> jax.Array:
  """Truncated importance sampling (TIS; Yao et al. 2025): per-token weights
  ``min(pi_trainer / pi_sampler, cap)`` = ``min(exp(trainer_logprobs - sampler_logprobs), cap)``
  (1 on padding), which correct the policy gradient for a sampler whose log-probs differ from the
  trainer's for the same parameters (another precision, another kernel). ``[batch, length]``; no
  gradient. ``cap`` > 0 (verl and TRL use 2)."""
  if cap <= 0:
    raise ValueError(f"the TIS cap must be > 0, got {cap}")
  log_w = jnp.where(jnp.asarray(mask) != 0, _f32(trainer_logprobs) - _f32(sampler_logprobs), 0.0)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               clip: float | None, aggregation: str = "token",
               fixed_length: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped value loss (OpenAI baselines ``ppo2``, lm-human-preferences), ``[batch, length]``:

    L = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -clip, clip) - R)^2)

  Gradients flow only to ``values``; ``clip=None`` gives ``0.5 * (V - R)^2``. Metrics: ``vf_loss``,
  ``vf_clipfrac`` (the clipped term is the larger), ``value_mean``.
  """
  old_values = jax.lax.stop_gradient(_f32(old_values))
  returns = jax.lax.stop_gradient(_f32(returns))
  valid = jnp.asarray(mask) != 0
  values_v = jnp.where(valid, _f32(values), 0.0)
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
  """``1 - Var[R - V] / Var[R]`` over masked tokens (1: perfect critic); nan if ``Var[R] == 0``."""
  values = jax.lax.stop_gradient(values)
  var_r = masked_var(returns, mask)
  var_diff = masked_var(returns - values, mask)
  return jnp.where(var_r > 0, 1.0 - var_diff / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """``log_softmax(logits)[token]`` in float32: ``[batch, length, vocab]``, ids ``[batch, length]``
  -> ``[batch, length]``. The one token-log-prob function (RL core and SFT loss)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy ``-sum_v p_v log p_v`` in nats, float32: ``[batch, length, vocab]`` -> ``[batch, length]``
  (``-inf`` logits contribute 0)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  # Zero log p where p == 0 before the product: 0 * -inf is nan in the backward pass otherwise.
  return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
