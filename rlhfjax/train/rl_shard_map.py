"""The explicit data-parallel (`jax.shard_map`) variant of the RL update.

`make_rl_update` leaves the data-parallel reduction to GSPMD. This variant writes it out: each device
computes the gradient of *its* slice of the minibatch and the slices are combined with one explicit
`psum` over the mesh's `data` axis. Everything else is `rl_update` unchanged (the optimizer step, the
KL controller, the `lax.scan` over epochs x minibatches), so both variants give the same result.

**Exact global loss normalization.** A per-device loss is normalized by its own aggregation units
(masked tokens, non-empty sequences or rows; `rl._units`), so averaging device gradients would weight
a device with few response tokens like one with many. Instead each device's gradient (and each of
its metrics) is weighted by `local units / global units` (global = `psum` of the local units) and the
weighted gradients are `psum`med:

    sum_d (U_d / U) * grad( L_d / U_d )  ==  grad( sum_d L_d / U )  ==  grad(whole-minibatch loss)

Metrics that are extrema (`*_max`, `*_min`) are combined with `pmax`/`pmin` instead.

**Shuffling.** The per-epoch permutation and the split into minibatches happen *outside* the
`shard_map`, on the global (batch-sharded) experience inside the same `jax.jit`: `x[perm]` is a global
gather that XLA lowers to the needed cross-device exchange, and each minibatch is then re-split over
`data` as the `shard_map` enters. Every device therefore sees a slice of exactly the minibatch the
jit variant uses — the same global-shuffle semantics, not a per-device shuffle (a per-device shuffle
would be cheaper, no exchange, but would change which responses share a minibatch, so results would
depend on the device count).

Parameters enter the `shard_map` replicated (`P()`); with fsdp/tensor axes > 1 the jit around it
gathers them first, and devices that share a `data` index compute the same slice redundantly — this
variant is meant for pure data parallelism (mesh `(N, 1, 1)`), where it is exact and cheapest.
Micro-batching works per device: `microbatch_size` is the global micro-batch, each device processes
`microbatch_size / N` rows at a time (the same number of micro-steps as the jit variant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlhfjax.train.rl import (EXPERIENCE_FIELDS, AlgoConfig, Experience, RLModels, RLState, _accumulate,
                              _units, critic_loss, make_rl_update, policy_loss)

DATA = "data"


def _combine(metrics: dict, frac, axis: str) -> dict:
  """Global metrics from per-device ones: unit-weighted sums, extrema by pmax/pmin."""
  out = {}
  for k, v in metrics.items():
    if k.endswith("_max"):
      out[k] = jax.lax.pmax(v, axis)
    elif k.endswith("_min"):
      out[k] = jax.lax.pmin(v, axis)
    else:
      out[k] = jax.lax.psum(frac * v, axis)
  return out


def local_minibatch_grads(policy_params, value_params, kl_coef, mb: Experience, *, algo: AlgoConfig,
                          models: RLModels, temperature: float, n_data: int, axis: str = DATA):
  """Per-device body: gradient of the local slice, weighted by its share of global units, psummed.

  Args:
    policy_params, value_params: replicated parameters (value None without a critic).
    kl_coef: scalar beta (replicated).
    mb: this device's slice of the minibatch, `[minibatch / n_data, ...]`.
    algo, models, temperature: as `rl_update`; n_data: size of the `data` axis.

  Returns:
    (policy grads, value grads or None, metrics), all identical on every device.
  """
  cfg = algo
  local_rows = mb.response_ids.shape[0]
  micro = cfg.microbatch_size // n_data if cfg.microbatch_size else 0
  n_micro = local_rows // micro if micro else 1
  units = _units(mb.response_mask, cfg.aggregation)
  total = jax.lax.psum(units, axis)
  frac = jnp.where(total > 0, units / jnp.maximum(total, 1e-30), 0.0)
  pl = lambda p, m: policy_loss(p, m, kl_coef, algo=algo, models=models,  # noqa: E731
                                temperature=temperature)
  pgrads, metrics = _accumulate(pl, policy_params, mb, n_micro, units, cfg.aggregation)
  pgrads = jax.tree.map(lambda g: jax.lax.psum(frac * g, axis), pgrads)
  vgrads = None
  if cfg.separate_critic:
    vl = lambda p, m: critic_loss(p, m, algo=algo, models=models)  # noqa: E731
    vgrads, vmetrics = _accumulate(vl, value_params, mb, n_micro, units, cfg.aggregation)
    vgrads = jax.tree.map(lambda g: jax.lax.psum(frac * g, axis), vgrads)
    metrics.update(vmetrics)
  return pgrads, vgrads, _combine(metrics, frac, axis)


def shard_map_grad_fn(algo: AlgoConfig, models: RLModels, mesh, *, temperature: float = 1.0,
                      axis: str = DATA):
  """A `grad_fn(state, minibatch)` for `rl_update` that runs `local_minibatch_grads` under
  `jax.shard_map` over `axis` (batch split, parameters replicated, explicit psum)."""
  cfg = algo
  n_data = mesh.shape[axis]
  if cfg.minibatch_size % n_data:
    raise ValueError(f"rl.minibatch_size={cfg.minibatch_size} must be a multiple of the data axis "
                     f"size {n_data} for the shard_map update")
  if cfg.microbatch_size and cfg.microbatch_size % n_data:
    raise ValueError(f"rl.microbatch_size={cfg.microbatch_size} must be a multiple of the data axis "
                     f"size {n_data} for the shard_map update")
  body = functools.partial(local_minibatch_grads, algo=algo, models=models, temperature=temperature,
                           n_data=n_data, axis=axis)
  mb_spec = Experience(**{k: P(axis) for k in EXPERIENCE_FIELDS})
  # check_vma=False: parameters are replicated inputs whose per-device gradients we sum ourselves
  # (with the varying-axes checker on, JAX would insert that psum in the transpose automatically).
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), mb_spec),
                          out_specs=(P(), P(), P()), check_vma=False)

  def grad_fn(state: RLState, mb: Experience):
    value_params = state.value.params if cfg.separate_critic else None
    return sharded(state.policy.params, value_params, state.kl.value, mb)
  return grad_fn


def make_rl_update_shard_map(algo: AlgoConfig, models: RLModels, policy_tx, value_tx, shardings, mesh,
                             rules, *, temperature: float = 1.0):
  """`jax.jit` of `rl_update` whose minibatch gradients come from the shard_map body; same
  signature, shardings and donation as `rlhfjax.train.rl.make_rl_update`."""
  grad_fn = shard_map_grad_fn(algo, models, mesh, temperature=temperature)
  return make_rl_update(algo, models, policy_tx, value_tx, shardings, mesh, rules,
                        temperature=temperature, grad_fn=grad_fn)
