"""The explicit data-parallel (`jax.shard_map`) variant of the RL update.

Where `make_rl_update` leaves the data-parallel reduction to GSPMD, here each device computes the
gradient of its slice of the minibatch and one explicit `psum` over `data` combines them; the rest
is `rl_update` unchanged, so both variants give the same result.

Exact normalization: each device's gradient and metrics are weighted by `local units / global
units` (`rl._units`; global = `psum`) before the `psum`, extrema (`*_max`, `*_min`) by `pmax`/`pmin`:

    sum_d (U_d / U) * grad( L_d / U_d )  ==  grad( sum_d L_d / U )  ==  grad(whole-minibatch loss)

Shuffling happens outside the `shard_map` on the global experience (a global gather), so every
device sees a slice of exactly the jit variant's minibatch, independent of the device count.
Parameters enter replicated: meant for pure data parallelism (mesh `(N, 1, 1)`); with larger
fsdp/tensor axes, devices sharing a `data` index compute the same slice redundantly.
`microbatch_size` is global: each device runs `microbatch_size / N` rows per micro-step.
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
  return {k: jax.lax.pmax(v, axis) if k.endswith("_max") else jax.lax.pmin(v, axis)
          if k.endswith("_min") else jax.lax.psum(frac * v, axis) for k, v in metrics.items()}


def local_minibatch_grads(policy_params, value_params, kl_coef, mb: Experience, *, algo: AlgoConfig,
                          models: RLModels, temperature: float, n_data: int, axis: str = DATA,
                          on_policy: bool = False):
  """Per-device body on `mb`, this device's `[minibatch / n_data, ...]` slice (parameters and
  `kl_coef` replicated, `value_params` None without a critic): the local gradient weighted by its
  share of the global units, psummed. Returns (policy grads, value grads or None, metrics), the
  same on every device."""
  micro = algo.microbatch_size // n_data if algo.microbatch_size else 0
  n_micro = mb.response_ids.shape[0] // micro if micro else 1
  units = _units(mb.response_mask, algo.aggregation)
  total = jax.lax.psum(units, axis)
  frac = jnp.where(total > 0, units / jnp.maximum(total, 1e-30), 0.0)
  pl = lambda p, m: policy_loss(p, m, kl_coef, algo=algo, models=models,  # noqa: E731
                                temperature=temperature, on_policy=on_policy)
  pgrads, metrics = _accumulate(pl, policy_params, mb, n_micro, units, algo.aggregation)
  pgrads = jax.tree.map(lambda g: jax.lax.psum((frac * g).astype(g.dtype), axis), pgrads)
  vgrads = None
  if algo.separate_critic:
    vl = lambda p, m: critic_loss(p, m, algo=algo, models=models)  # noqa: E731
    vgrads, vmetrics = _accumulate(vl, value_params, mb, n_micro, units, algo.aggregation)
    vgrads = jax.tree.map(lambda g: jax.lax.psum((frac * g).astype(g.dtype), axis), vgrads)
    metrics.update(vmetrics)
  return pgrads, vgrads, _combine(metrics, frac, axis)


def shard_map_grad_fn(algo: AlgoConfig, models: RLModels, mesh, *, temperature: float = 1.0,
                      axis: str = DATA):
  """A `grad_fn(state, minibatch)` for `rl_update` that runs `local_minibatch_grads` under
  `jax.shard_map` over `axis` (batch split, parameters replicated, explicit psum)."""
  n_data = mesh.shape[axis]
  if algo.packs:
    raise ValueError(f"rl.{'pack' if algo.pack else 'share_prompt'} works with the jit update only "
                     f"(rl_loop.update_variant='jit')")
  for name in ("minibatch_size", "microbatch_size"):
    if getattr(algo, name) % n_data:  # a microbatch_size of 0 (off) passes
      raise ValueError(f"rl.{name}={getattr(algo, name)} must be a multiple of the data axis "
                       f"size {n_data} for the shard_map update")
  mb_spec = Experience(**{k: P(axis) for k in EXPERIENCE_FIELDS})

  def grad_fn(state: RLState, mb: Experience, on_policy: bool = False):
    body = functools.partial(local_minibatch_grads, algo=algo, models=models, temperature=temperature,
                             n_data=n_data, axis=axis, on_policy=on_policy)
    # check_vma=False: parameters are replicated inputs whose per-device gradients we sum ourselves
    # (with the varying-axes checker on, JAX would insert that psum in the transpose automatically).
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), mb_spec),
                            out_specs=(P(), P(), P()), check_vma=False)
    value_params = state.value.params if algo.separate_critic else None
    return sharded(state.policy.params, value_params, state.kl.value, mb)
  return grad_fn


def make_rl_update_shard_map(algo: AlgoConfig, models: RLModels, policy_tx, value_tx, shardings, mesh,
                             rules, *, temperature: float = 1.0):
  """`jax.jit` of `rl_update` whose minibatch gradients come from the shard_map body; same
  signature, shardings and donation as `rlhfjax.train.rl.make_rl_update`."""
  grad_fn = shard_map_grad_fn(algo, models, mesh, temperature=temperature)
  return make_rl_update(algo, models, policy_tx, value_tx, shardings, mesh, rules,
                        temperature=temperature, grad_fn=grad_fn)
