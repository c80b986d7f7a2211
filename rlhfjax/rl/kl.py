"""KL estimators and KL-coefficient controllers.

The controllers are pure: hyperparameters live in a frozen (hashable, static) dataclass, the
changing coefficient lives in ``KLState``, a pytree that sits inside the train state, is
checkpointed with it, and is updated inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token sample estimate of ``KL(pi || ref)`` from tokens sampled from ``pi``.

  From Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), with
  ``log_r = ref_logprobs - logprobs`` (the log of ``ref(x) / pi(x)``):

    k1 = -log_r                     unbiased, high variance, can be negative
    k2 = 0.5 * log_r ** 2           biased, low variance, >= 0
    k3 = (exp(log_r) - 1) - log_r   unbiased, low variance, >= 0

  Args:
    logprobs: ``log pi(x_t)`` of the sampled tokens, e.g. ``[batch, length]``.
    ref_logprobs: ``log ref(x_t)`` of the same tokens, same shape.
    kind: ``"k1"``, ``"k2"`` or ``"k3"`` (static).

  Returns:
    The per-token estimate, same shape as ``logprobs``.
  """
  log_r = jnp.asarray(ref_logprobs) - jnp.asarray(logprobs)
  if kind == "k1":
    return -log_r
  if kind == "k2":
    return 0.5 * jnp.square(log_r)
  if kind == "k3":
    return jnp.expm1(log_r) - log_r
  raise ValueError(f"kl_estimate: kind must be one of {KL_KINDS}, got {kind!r}.")


@flax.struct.dataclass
class KLState:
  """The KL coefficient ``beta`` a controller carries between steps (a pytree of one scalar)."""

  value: jax.Array


@dataclasses.dataclass(frozen=True)
class FixedKLController:
  """A constant KL coefficient, with the same interface as ``AdaptiveKLController``.

  Attributes:
    kl_coef: the coefficient ``beta`` of the per-token KL penalty.
  """

  kl_coef: float

  def init(self) -> KLState:
    """Returns the initial state, ``value = kl_coef`` (float32 scalar)."""
    return KLState(value=jnp.asarray(self.kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: jax.Array, n_steps: jax.Array) -> KLState:
    """Returns ``state`` unchanged (arguments accepted for interface compatibility)."""
    del current_kl, n_steps
    return state


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
  """Proportional controller that steers the observed KL toward a target.

  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2:

    e_t     = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

  Attributes:
    init_kl_coef: initial ``beta`` (0.2 in lm-human-preferences' sentiment config).
    target: target KL in nats per sequence (6.0 in lm-human-preferences).
    horizon: steps (samples) over which the error is corrected (10000 in lm-human-preferences).
  """

  init_kl_coef: float
  target: float
  horizon: float

  def init(self) -> KLState:
    """Returns the initial state, ``value = init_kl_coef`` (float32 scalar)."""
    return KLState(value=jnp.asarray(self.init_kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: jax.Array, n_steps: jax.Array) -> KLState:
    """One controller step.

    Args:
      state: the current ``KLState``.
      current_kl: observed KL(pi || ref), scalar, in the same units as ``target``.
      n_steps: number of samples (or steps) since the last update, scalar.

    Returns:
      The new ``KLState``.
    """
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / self.horizon
    return KLState(value=(state.value * mult).astype(state.value.dtype))
