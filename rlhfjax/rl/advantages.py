"""Advantage estimators: GAE with a critic, and the critic-free group baselines.

Token-level functions take ``[batch, length]`` arrays and a ``mask`` (1.0 on tokens that count).
Sequence-level ones take one reward per response, ``[n * g]``, grouped contiguously by prompt
(``ValueError`` unless ``2 <= g`` divides the length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rlhfjax.rl.masked import whiten


def _float_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """GAE (Schulman et al. 2016, eq. 16) over padded rows ``[batch, length]`` (or one ``[length]``).

    delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'}

  ``t'`` is the next position with mask 1: mask-0 positions are skipped (not in the recurrence,
  advantage and return 0); the episode ends after each row's last masked token (``V = A = 0``).
  Returns ``(advantages, returns)``, ``returns = advantages + values`` on masked tokens, else 0;
  no ``stop_gradient``. Raises ``ValueError`` unless the three shapes match.
  """
  rewards, values, mask = jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
  if not rewards.shape == values.shape == mask.shape:
    raise ValueError(f"gae: rewards {rewards.shape}, values {values.shape}, mask {mask.shape} "
                     "must match.")
  if rewards.ndim == 1:
    adv, ret = gae(rewards[None], values[None], mask[None], gamma=gamma, lam=lam)
    return adv[0], ret[0]
  dtype = _float_dtype(rewards, values)
  rewards, values = rewards.astype(dtype), values.astype(dtype)
  valid = mask != 0

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + (gamma * lam) * next_adv
    new_carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return new_carry, jnp.where(m, adv, jnp.zeros((), dtype))

  zeros = jnp.zeros(rewards.shape[:1], dtype)
  _, adv_t = lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
  advantages = adv_t.T
  returns = jnp.where(valid, advantages + values, jnp.zeros((), dtype))
  return advantages, returns


def discounted_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
  """Return-to-go ``G_t = r_t + gamma * G_{t'}`` ``[batch, length]``: ``gae`` with V = 0, lam = 1."""
  rewards = jnp.asarray(rewards)
  advantages, _ = gae(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
  return advantages


def reinforce_pp_advantages(token_rewards: jax.Array, mask: jax.Array, *,
                            gamma: float = 1.0) -> jax.Array:
  """REINFORCE++ (Hu 2025, sec. 3): the return-to-go of ``token_rewards`` ``[batch, length]``
  (score on the last token minus ``beta * KL_t``), whitened over all masked tokens of the batch."""
  return whiten(discounted_returns(token_rewards, mask, gamma=gamma), mask)


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [n * group_size], got shape {rewards.shape}.")
  if group_size < 2 or rewards.shape[0] % group_size:
    raise ValueError(f"group_size={group_size} must be >= 2 and divide "
                     f"len(rewards)={rewards.shape[0]}.")
  return rewards.astype(_float_dtype(rewards)).reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> jax.Array:
  """GRPO advantages ``[n * g]`` (Shao et al. 2024, sec. 4.1.2): ``(r_i - mean(group)) / (std + eps)``.

  ``scale``: ``"group"`` (the group's std, GRPO), ``"batch"`` (the whole batch's std, Lite PPO of
  Liu et al. 2025) or ``"none"`` (only center, Dr. GRPO). Stds are unbiased (``ddof=1``).
  """
  r = _grouped(rewards, group_size)
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  if scale == "group":
    centered = centered / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
  elif scale == "batch":
    centered = centered / (jnp.std(r, ddof=1) + eps)
  elif scale != "none":
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}.")
  return centered.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """RLOO advantages ``[n * g]`` (Ahmadian et al. 2024, eq. 10): ``r_i - mean_{j != i} r_j``."""
  r = _grouped(rewards, group_size)
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - others).reshape(-1)


def best_of_n_select(rewards: jax.Array, group_size: int, k: int) -> jax.Array:
  """Best-of-N weights ``[n * g]``: +1 for the top-k of each group, -1 for the bottom-k, else 0.

  Ranked by reward, ties to the lower index. Needs ``1 <= k`` and ``2 * k <= group_size``.
  """
  if k < 1 or 2 * k > group_size:
    raise ValueError(f"best_of_n_select needs 1 <= k and 2 * k <= group_size, got k={k}, "
                     f"group_size={group_size}.")
  r = _grouped(rewards, group_size)
  order = jnp.argsort(-r, axis=1, stable=True)  # descending reward, lower index first on ties
  rank = jnp.argsort(order, axis=1)
  weights = jnp.where(rank < k, 1.0, jnp.where(rank >= group_size - k, -1.0, 0.0))
  return weights.astype(r.dtype).reshape(-1)


def broadcast_sequence_advantage(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """``[batch]`` advantages -> ``[batch, length]``: ``advantages[b]`` where ``mask[b, t]``, else 0."""
  advantages = jnp.asarray(advantages)
  mask = jnp.asarray(mask)
  dtype = _float_dtype(advantages)
  return jnp.where(mask != 0, advantages[:, None].astype(dtype), jnp.zeros((), dtype))
