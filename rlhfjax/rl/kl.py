"""KL estimators and KL-coefficient controllers.

Controllers are pure: hyperparameters in a frozen (static) dataclass, the coefficient in ``KLState``,
a pytree inside the train state (checkpointed with it, updated inside the jitted step).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token estimate of ``KL(pi || ref)`` on tokens sampled from ``pi``, same shape as the inputs
  (float32 or wider).

  Schulman 2020, "Approximating KL Divergence", with ``log_r = ref_logprobs - logprobs`` (another
  ``kind`` raises ``ValueError``):

    k1 = -log_r                     unbiased, high variance, can be negative
    k2 = 0.5 * log_r ** 2           biased, low variance, >= 0
    k3 = (exp(log_r) - 1) - log_r   unbiased, low variance, >= 0
  """
  logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
  # float32 or wider: in bf16, k3's ``expm1(log_r) - log_r`` cancels to noise for small ``log_r``.
  dtype = jnp.promote_types(jnp.result_type(logprobs, ref_logprobs), jnp.float32)
  log_r = ref_logprobs.astype(dtype) - logprobs.astype(dtype)
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
  """A constant KL coefficient ``beta``, with the interface of ``AdaptiveKLController``."""

  kl_coef: float

  def init(self) -> KLState:
    return KLState(value=jnp.asarray(self.kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: jax.Array, n_steps: jax.Array) -> KLState:
    del current_kl, n_steps
    return state


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
  """Proportional controller steering the observed KL toward a target (Ziegler et al. 2019, sec. 2.2):

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon
  """

  init_kl_coef: float  # initial beta (0.2 in lm-human-preferences)
  target: float  # target KL, nats per sequence (6.0 in lm-human-preferences)
  horizon: float  # samples over which the error is corrected (10000 in lm-human-preferences)

  def init(self) -> KLState:
    return KLState(value=jnp.asarray(self.init_kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: jax.Array, n_steps: jax.Array) -> KLState:
    """One step: ``current_kl`` (scalar, units of ``target``) after ``n_steps`` samples."""
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / self.horizon
    return KLState(value=(state.value * mult).astype(state.value.dtype))
