"""Advantage estimators: GAE with a critic, and the critic-free group baselines.

Token-level functions take ``[batch, length]`` arrays and a ``mask`` that is 1.0 on response
tokens that count. Sequence-level functions take one scalar reward per sampled response,
``[n * g]``, grouped contiguously by prompt: ``[p0a0, p0a1, ..., p0a(g-1), p1a0, ...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rlhfjax.rl.masked import whiten


def _float_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation over padded token sequences.

  Implements Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation", eq. 16, as the backward recursion

    delta_t = r_t + gamma * V_{t'} - V_t
    A_t     = delta_t + gamma * lam * A_{t'}

  where ``t'`` is the next position *with mask 1* in the row. Positions with mask 0 (left padding
  of the prompt, right padding after EOS, or masked-out tokens inside a response) are skipped:
  they are not part of the recurrence, their reward and value are ignored, and their advantage
  and return are 0. The episode ends at the last masked token of each row (EOS or truncation),
  where ``V_{t'} = 0`` and ``A_{t'} = 0``. A row with no masked token gets all zeros.

  Args:
    rewards: per-token rewards ``[batch, length]`` (e.g. ``-beta * KL`` everywhere plus the
      score on the last response token). A ``[length]`` vector is treated as one row.
    values: critic values ``V(s_t)`` ``[batch, length]``.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    gamma: discount factor (1.0 in Ouyang et al. 2022 / lm-human-preferences).
    lam: GAE lambda (0.95 in lm-human-preferences).

  Returns:
    ``(advantages, returns)``, both ``[batch, length]``; ``returns = advantages + values`` on
    masked tokens and 0 elsewhere. Neither is wrapped in ``stop_gradient``.
  """
  rewards, values, mask = jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
  if not rewards.shape == values.shape == mask.shape:
    raise ValueError(
        f"gae: rewards {rewards.shape}, values {values.shape}, mask {mask.shape} must match."
    )
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
  """Per-token discounted return-to-go ``G_t = r_t + gamma * G_{t'}`` over masked tokens.

  Same padding semantics as ``gae`` (``t'`` is the next masked position, mask-0 positions are
  skipped and get 0); equal to ``gae`` with zero values and ``lam = 1``.

  Args:
    rewards: per-token rewards ``[batch, length]``.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    gamma: discount factor.

  Returns:
    Returns-to-go ``[batch, length]``.
  """
  rewards = jnp.asarray(rewards)
  advantages, _ = gae(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
  return advantages


def reinforce_pp_advantages(
    token_rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0
) -> jax.Array:
  """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
  Large Language Models", sec. 3): the discounted return-to-go of the token rewards, whitened over
  all masked tokens of the batch (the global batch normalization that replaces a critic).

  Args:
    token_rewards: ``[batch, length]`` per-token reward already combined by the caller: the
      score on the last response token minus ``beta * KL_t`` on every token.
    mask: ``[batch, length]``, 1.0 on tokens that count.
    gamma: discount factor (1.0 in the paper).

  Returns:
    Advantages ``[batch, length]``, zero mean / unit (unbiased) variance over masked tokens,
    0 where mask is 0.
  """
  return whiten(discounted_returns(token_rewards, mask, gamma=gamma), mask)


def _grouped(rewards: jax.Array, group_size: int, min_size: int = 2) -> jax.Array:
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [n * group_size], got shape {rewards.shape}.")
  if group_size < min_size or rewards.shape[0] % group_size:
    raise ValueError(
        f"group_size={group_size} must be >= {min_size} and divide len(rewards)={rewards.shape[0]}."
    )
  return rewards.astype(_float_dtype(rewards)).reshape(-1, group_size)


def group_advantages(
    rewards: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> jax.Array:
  """Group-relative advantages of GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, outcome
  supervision): ``A_i = (r_i - mean(group)) / (std(group) + eps)``.

  Args:
    rewards: ``[n * g]`` one scalar per response, grouped contiguously by prompt.
    group_size: ``g``, responses per prompt (>= 2).
    scale: ``"group"``: divide by the std of the response's own group (GRPO);
      ``"batch"``: divide by the std of all rewards in the batch (group mean, batch std — Liu et
      al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", Lite PPO);
      ``"none"``: only center (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training").
      Stds are unbiased (``ddof=1``, like ``torch.std`` in TRL / OpenRLHF).
    eps: added to the std.

  Returns:
    Advantages ``[n * g]``.
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
  """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs", eq. 10):
  ``A_i = r_i - 1/(g-1) * sum_{j != i} r_j``.

  Args:
    rewards: ``[n * g]`` one scalar per response, grouped contiguously by prompt.
    group_size: ``g`` (>= 2).

  Returns:
    Advantages ``[n * g]``.
  """
  r = _grouped(rewards, group_size)
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - others).reshape(-1)


def best_of_n_select(rewards: jax.Array, group_size: int, k: int) -> jax.Array:
  """Best-of-N rejection-sampling weights: +1 for the top-k of each group, -1 for the bottom-k.

  Within each group, responses are ranked by reward (descending); ties are broken by index, the
  lower index ranking higher. Ranks ``< k`` get +1, ranks ``>= g - k`` get -1, the rest 0.
  Use +1 rows for best-of-N SFT, or (+1, -1) pairs for preference data.

  Args:
    rewards: ``[n * g]`` one scalar per response, grouped contiguously by prompt.
    group_size: ``g``.
    k: responses kept at each end, ``1 <= k`` and ``2 * k <= g``.

  Returns:
    Weights ``[n * g]`` in ``{-1., 0., +1.}``.
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
  """Spreads one advantage per sequence over that sequence's masked tokens.

  Args:
    advantages: ``[batch]``.
    mask: ``[batch, length]``.

  Returns:
    ``[batch, length]``: ``advantages[b]`` where ``mask[b, t]`` is set, else 0.
  """
  advantages = jnp.asarray(advantages)
  mask = jnp.asarray(mask)
  dtype = _float_dtype(advantages)
  return jnp.where(mask != 0, advantages[:, None].astype(dtype), jnp.zeros((), dtype))
