"""Mesh, logical axis names and rules: the only place `NamedSharding`s are made."""

from rlhfjax.parallel import axes
from rlhfjax.parallel.mesh import (batch_sharding, create_mesh, data_parallel_size, logical_sharding,
                                   logical_to_sharding, replicated, resolve_mesh_shape, shard_batch)
