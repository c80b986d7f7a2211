"""Multi-process runs: `initialize` (before any JAX computation) joins the run's processes, and
`primary_first` lets process 0 build what every process then reads (data set, tokenizer).

Each process holds its own rows of a batch (`DataIterator` shards by `jax.process_index()`) and
`shard_batch` assembles the global array; Orbax saves and restores every process's shards.
"""

from __future__ import annotations

import contextlib

import jax


def _cluster_detected() -> bool:
  """Whether `jax.distributed.initialize()` would find its settings itself: JAX's own detectors
  (Cloud TPU VM, GKE TPU, Kubernetes with the `kubernetes` package, SLURM inside `srun`, Open MPI)."""
  from jax._src import clusters  # no public API says whether one is present
  return any(not c.opt_in_only_method and c.is_env_present() for c in clusters.ClusterEnv._cluster_types)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Join a multi-process run: with any argument given, `jax.distributed.initialize` with them
  (JAX auto-detects the rest); with none, only inside a cluster JAX recognizes. One process (no
  cluster, or `num_processes=1`): nothing."""
  if num_processes == 1 or jax.distributed.is_initialized():
    return
  if (coordinator_address, num_processes, process_id) == (None, None, None) and not _cluster_detected():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


@contextlib.contextmanager
def primary_first(name: str = "primary_first"):
  """Process 0 runs the block, then the others do (reading what it wrote to the shared workdir)."""
  from jax.experimental.multihost_utils import sync_global_devices
  many, primary = jax.process_count() > 1, jax.process_index() == 0
  if many and not primary:
    sync_global_devices(name)
  yield
  if many and primary:
    sync_global_devices(name)
