"""DPO-family losses: the policy is its own reward model, r = β·(log π(y|x) − log π_ref(y|x)).

Inputs are summed response log-probs ``[batch]`` of the chosen (preferred) and rejected responses
under the trained policy and the frozen reference; gradients flow only to the policy's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfjax.rl.masked import masked_mean

LOSS_TYPES = ("sigmoid", "ipo")


def _f32(x: jax.Array) -> jax.Array:
  """``x`` in float32 or wider: summed log-probs are large, their bf16 differences mostly rounding."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, weights: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DPO family on h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)):

    sigmoid: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)   (Rafailov et al. 2023, eq. 7; ε > 0 is
             conservative DPO, Mitchell 2023: labels flipped with probability ε)
    ipo:     (h − 1/(2β))²                         (Azar et al. 2023, eq. 17, β as their τ)

  Args:
    chosen_logps, rejected_logps: policy log-probs [batch].
    ref_chosen_logps, ref_rejected_logps: reference log-probs [batch] (not differentiated).
    beta: strength of the KL regularization (Rafailov et al.: 0.1; smaller lets the policy move).
    loss_type: one of `LOSS_TYPES`.
    label_smoothing: ε of the sigmoid loss (0 = DPO).
    weights: [batch] pair weights of the mean (None = all 1; 0 drops a pair).

  Returns:
    (loss, metrics) with TRL's `DPOTrainer` logs: `rewards_chosen` / `rewards_rejected` (mean
    implicit rewards β·(log π − log π_ref)), `reward_accuracy` (chosen strictly above rejected),
    `reward_margin` (mean difference), `logps_chosen` / `logps_rejected` (policy).
  """
  sg = jax.lax.stop_gradient
  chosen_logps, rejected_logps = _f32(chosen_logps), _f32(rejected_logps)
  ref_chosen_logps, ref_rejected_logps = sg(_f32(ref_chosen_logps)), sg(_f32(ref_rejected_logps))
  h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
  if loss_type == "sigmoid":
    per_pair = ((1 - label_smoothing) * jax.nn.softplus(-beta * h)
                + label_smoothing * jax.nn.softplus(beta * h))
  elif loss_type == "ipo":
    per_pair = jnp.square(h - 1 / (2 * beta))
  else:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  w = jnp.ones_like(h) if weights is None else weights
  mean = lambda x: masked_mean(x, w)  # noqa: E731
  loss = mean(per_pair)
  chosen = sg(beta * (chosen_logps - ref_chosen_logps))
  rejected = sg(beta * (rejected_logps - ref_rejected_logps))
  return loss, {"loss": sg(loss), "rewards_chosen": mean(chosen),
                "rewards_rejected": mean(rejected),
                "reward_accuracy": mean((chosen > rejected).astype(jnp.float32)),
                "reward_margin": mean(chosen - rejected), "logps_chosen": mean(sg(chosen_logps)),
                "logps_rejected": mean(sg(rejected_logps))}
