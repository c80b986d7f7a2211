"""The one place shardings are made: mesh construction and logical-axis → NamedSharding.

Mesh axes are `("data", "fsdp", "tensor")`, `AxisType.Auto` on purpose: steps are `jax.jit` with
explicit in/out shardings and GSPMD propagates the rest, so model code has no sharding annotations
(JAX ≥ 0.10's `make_mesh` defaults to Explicit axes, which put shardings into types).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhfjax.parallel import axes as ax

Rules = Sequence[tuple[str, Any]]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fill in at most one -1 so the product equals `num_devices`; errors say what is wrong."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(ax.MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(ax.MESH_AXES)} entries for axes {ax.MESH_AXES}")
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"mesh shape {shape} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} has a non-positive size")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def create_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A `("data", "fsdp", "tensor")` mesh over `devices` (default: all), one axis may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  try:
    from jax.sharding import AxisType
    return jax.make_mesh(shape, ax.MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto,) * len(shape))
  except (ImportError, TypeError):  # older JAX: no axis types, Auto is the only behaviour
    return Mesh(np.asarray(devices).reshape(shape), ax.MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules: Rules = ax.DEFAULT_RULES):
  """Map a pytree of logical PartitionSpecs to NamedShardings on `mesh` via the rules table."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules = ax.DEFAULT_RULES):
  """NamedSharding for one array whose dims have the given logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), [tuple(r) for r in rules]))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = ax.DEFAULT_RULES) -> NamedSharding:
  """Leading dim on the batch axes, the rest replicated."""
  return logical_sharding(mesh, (ax.BATCH,) + (None,) * (ndim - 1), rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules: Rules = ax.DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split (the batch must be a multiple of this)."""
  spec = nn.logical_to_mesh_axes((ax.BATCH,), [tuple(r) for r in rules])[0]
  names = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  return math.prod(mesh.shape[n] for n in names)


def shard_batch(batch, mesh: Mesh, rules: Rules = ax.DEFAULT_RULES):
  """One global array per leaf (leading dim = batch) from this process's `b` rows: process `i` of
  `n` gives rows `i*b:(i+1)*b` of the `n*b`-row batch (the batch axes span the processes in device
  order, as `create_mesh` lays them out). One process: the whole batch, as `device_put`."""
  dp = data_parallel_size(mesh, rules)
  def put(x):
    x = np.asarray(x)
    if x.shape[0] * jax.process_count() % dp:
      raise ValueError(f"batch of {x.shape[0] * jax.process_count()} is not divisible by the "
                       f"data-parallel size {dp}")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)
  return jax.tree.map(put, batch)
