"""Initializing models into plain parameter pytrees plus their logical partition specs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Token positions for left/right-padded rows: cumsum(mask) - 1, clipped at 0. [B, T] -> int32."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _dummy_inputs(length: int):
  tokens = jnp.zeros((1, length), jnp.int32)
  mask = jnp.ones((1, length), jnp.int32)
  return tokens, positions_from_mask(mask), mask


def logical_specs(module: nn.Module, length: int = 8):
  """The logical PartitionSpec of every parameter (computed abstractly, no FLOPs)."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *_dummy_inputs(length)))
  return nn.get_partition_spec(boxed)["params"]


def init_params(module: nn.Module, rng: jax.Array, length: int = 8):
  """Plain (unboxed) parameters of `module`: the pytree `module.apply({"params": p}, ...)` takes.

  Jitted (one compile per module config), which is much faster than eager init of a scanned trunk.
  """
  return _jit_init(module, length)(rng)


@functools.lru_cache(maxsize=64)
def _jit_init(module: nn.Module, length: int):
  return jax.jit(lambda rng: nn.unbox(module.init(rng, *_dummy_inputs(length)))["params"])
