"""Train states, optimizers and their sharded creation.

`TrainState` is a plain pytree (step, params, opt_state, rng); the optax transformation lives outside
it (in the step's closure), so the state can be donated, checkpointed and sharded as one tree.
Shardings come from `jax.eval_shape` of the *boxed* init (parameters carry logical axis names, and optax
states built from boxed parameters inherit them) mapped through the rules table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhfjax.models.init import _dummy_inputs
from rlhfjax.models.transformer import UNSTACKED
from rlhfjax.parallel import logical_to_sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # typed PRNG key; per-step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup + cosine decay and global-norm clipping."""

  learning_rate: float = 1e-3  # peak learning rate
  warmup_steps: int = 50  # linear warmup from 0
  decay_steps: int = 0  # cosine decay length after warmup; 0 = the stage's total steps
  min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * learning_rate
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01  # decoupled; on what `decay_mask` says (matrices, and every built-in layer parameter)
  grad_clip: float = 1.0  # global-norm clip; 0 = off


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  decay = cfg.decay_steps or max(total_steps, cfg.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(decay, cfg.warmup_steps + 1),
                                                end_value=cfg.learning_rate * cfg.min_lr_ratio)
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  chain.append(optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)


def decay_mask(params):
  """Which parameters weight decay applies to, the same whether the built-in trunk's `layers` are
  stacked on a leading axis (the scan's layout, in which this mask was always computed) or split
  per layer (`models.transformer.unstack_layers`, the RL update's layout): every layer parameter
  (stacked, even a norm scale is 2-d, and trained figures depend on that) and every other
  parameter of 2 dims and up (embeddings, heads; not the final norm or scalar gains)."""
  def matrix(path, p):
    keys = [getattr(k, "key", None) for k in path]
    per_layer = any(keys[i:i + 3] == ["trunk", "layers", UNSTACKED] for i in range(len(keys)))
    return jnp.ndim(p) + per_layer >= 2
  return jax.tree_util.tree_map_with_path(matrix, params)


def _state_fn(module: nn.Module, tx: optax.GradientTransformation, length: int, boxed: bool):
  """`init(rng, params=None) -> TrainState`; fresh parameters keep their logical axes if `boxed`."""
  def init(rng, params=None):
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
      params = module.init(init_rng, *_dummy_inputs(length))["params"]
      params = params if boxed else nn.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)
  return init


def state_shardings(module: nn.Module, tx: optax.GradientTransformation, mesh, rules,
                    length: int = 8):
  """(abstract unboxed state, NamedSharding tree), computed abstractly: nothing is allocated."""
  boxed = jax.eval_shape(_state_fn(module, tx, length, boxed=True), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  return nn.unbox(boxed), logical_to_sharding(specs, mesh, rules)


def create_train_state(module: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, mesh,
                       rules, *, params=None, length: int = 8):
  """(sharded TrainState, shardings): fresh parameters, or `params` (a plain tree, e.g. SFT weights)
  placed by the model's shardings; initialization runs jitted, directly into the shardings."""
  _, shardings = state_shardings(module, tx, mesh, rules, length)
  if params is not None:
    params = jax.device_put(params, shardings.params)
  init = _state_fn(module, tx, length, boxed=False)
  return jax.jit(init, out_shardings=shardings)(rng, params), shardings
