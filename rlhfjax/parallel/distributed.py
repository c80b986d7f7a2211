"""Multi-process runs: `initialize` (before any JAX computation) joins the run's processes, and
`primary_first` lets process 0 build what every process then reads (data set, tokenizer).

Each process holds its own rows of a batch (`DataIterator` shards by `jax.process_index()`, or
`process_rows` takes its block of a global batch) and `shard_batch` assembles the global array;
`local_rows` is the way back (what a process decodes and scores); `process_mean` / `process_max`
reduce host numbers so every process takes the same decisions. Orbax saves and restores every
process's shards.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np


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


def process_rows(rows: list) -> list:
  """This process's contiguous block of a global batch (the rows `shard_batch` expects from it)."""
  n, i = jax.process_count(), jax.process_index()
  if len(rows) % n:
    raise ValueError(f"a batch of {len(rows)} does not split over {n} processes")
  return rows[i * len(rows) // n:(i + 1) * len(rows) // n]


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, on the host (`np.asarray` in one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  parts = {s.index[0].indices(x.shape[0])[:2]: s.data for s in x.addressable_shards}
  rows = np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])
  if rows.shape[0] * jax.process_count() != x.shape[0]:
    raise ValueError(f"{x.sharding} does not split the batch over the processes")
  return rows


def _allgather(values) -> np.ndarray:
  from jax.experimental.multihost_utils import process_allgather
  return np.asarray(process_allgather(np.asarray(values)))  # [processes, ...]


def process_mean(values: dict, sum_prefixes: tuple[str, ...] = ()) -> dict:
  """Host scalars (the same keys on every process) reduced over the processes, the same dict on
  each: the mean of the non-NaN values (NaN if none), the sum for keys starting with `sum_prefixes`."""
  if jax.process_count() == 1:
    return values
  keys = sorted(values)
  v = _allgather(np.asarray([values[k] for k in keys], np.float32)).astype(np.float64)
  ok = ~np.isnan(v)
  mean = np.where(ok, v, 0).sum(0) / np.where(ok.any(0), ok.sum(0), np.nan)
  return {k: float(v[:, j].sum() if k.startswith(sum_prefixes) else mean[j]) for j, k in enumerate(keys)}


def process_max(x: int) -> int:
  """The largest of the processes' `x` (e.g. a signal one of them received), on every process."""
  return x if jax.process_count() == 1 else int(_allgather(np.int32(x)).max())
