"""Orbax checkpoints for a run: one train-state pytree plus a small JSON `meta` dict per step.

Layout ``directory/<step>/{state,meta}`` (Orbax ``CheckpointManager``): ``state`` is any pytree of
``jax.Array`` / ``np.ndarray`` / scalars (params, optimizer state, step, rng key, KL-controller
state; ``StandardSave``, sharded-aware); ``meta`` a JSON dict (data-iterator position, stage, ...).

Typed PRNG keys (``jax.random.key``) have an extended dtype tensorstore cannot write: ``save``
stores ``jax.random.key_data`` (``uint32[..., 2]`` for threefry), and ``restore`` re-wraps it with
the key implementation of the *abstract target*, which must therefore say the leaf is a typed key
(as ``jax.eval_shape`` / ``abstract_like`` of the live state does). Legacy raw ``uint32[2]`` keys
are plain arrays.

Crash safety: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when
complete (atomic on POSIX; GCS uses a commit marker). A save killed midway leaves only the tmp
directory, which is ignored (and deleted on start-up), so ``latest_step`` is always complete.
A step damaged later (a truncated file, a disk error) is what ``restore_latest_good`` falls back
from: it restores the newest step that restores and moves the newer broken ones aside.

Async saves: ``save`` returns once device arrays are copied to host memory (so the state may be
donated/deleted in the next jitted step) and writes on a background thread. Call ``wait()`` (or
``close()``, or leave the ``with`` block) before exiting or reading the checkpoint from another
process; a later ``save`` waits for the previous one.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_STATE = "state"
_META = "meta"


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def abstract_like(state, shardings=None):
  """``jax.ShapeDtypeStruct`` pytree (``.sharding`` set where known) describing ``state``, a pytree
  of arrays or ShapeDtypeStructs, for ``Checkpointer.restore``. Python/NumPy scalars become 0-d
  structs, restored as 0-d ``jax.Array``s (64-bit narrowed to 32-bit unless ``jax_enable_x64``);
  typed PRNG keys keep their key dtype (``restore`` relies on it). ``shardings``: ``None`` (each
  leaf's own ``.sharding``, if any), one ``jax.sharding.Sharding`` for every leaf, or a pytree of
  shardings matching ``state``."""
  def one(x, s):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      x = np.asarray(x)
    sharding = s if s is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), state)
  return jax.tree.map(one, state, shardings)


def _key_data_abstract(x: jax.ShapeDtypeStruct, default_sharding) -> jax.ShapeDtypeStruct:
  """Abstract ``key_data`` of an abstract typed key: extra trailing dims, uint32, same layout."""
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  extra = data.ndim - len(x.shape)
  sharding = x.sharding if x.sharding is not None else default_sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, *(None,) * extra))
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    # Other shardings (e.g. Positional/GSPMD) cannot be extended generically: replicate the tiny key.
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(list(sharding.device_set)), ("d",)), jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


class Checkpointer:
  """Save/restore a train-state pytree plus JSON meta with step management.

  Example::

    with Checkpointer(workdir + "/checkpoints", max_to_keep=3, save_interval_steps=100) as ckpt:
      if (step := ckpt.latest_step()) is not None:
        state, meta = ckpt.restore(abstract_like(state))   # or eval_shape(init) + shardings
        data_iter.set_state(meta["data"])
      for step in ...:
        state = train_step(state, batch)
        ckpt.save(step, state, {"data": data_iter.get_state(), "stage": "ppo"})
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    """``directory``: checkpoint root (created if missing), a local path or any epath (gs://...).
    Keeps the newest ``max_to_keep`` complete steps (None: all); ``save`` writes only when
    ``step % save_interval_steps == 0`` (unless ``force=True``); ``async_save`` writes to disk on a
    background thread (see module docstring)."""
    self.directory = os.fspath(directory)
    self._interval = max(1, int(save_interval_steps))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # drop leftovers of saves killed mid-write
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

  # -- saving ---------------------------------------------------------------------------------

  def save(self, step: int, state, meta: dict | None = None, *, force: bool = False) -> bool:
    """Saves ``state`` and ``meta`` as ``step``; True if a save was started. Skipped (False) when
    ``step`` is not a multiple of ``save_interval_steps`` (unless ``force``) or not newer than the
    latest saved step (re-running a step after resume is a no-op, not an error). With ``async_save``
    the write continues in the background; ``state`` may be donated/deleted once this returns."""
    step = int(step)
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      return False
    # Plain `step % interval` (Orbax's own policy would also always save the first step seen).
    # A preemption notice (multi-host TPU) also triggers a save, as in Orbax.
    if not force and step % self._interval and not self._manager.reached_preemption(step):
      return False
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _META: ocp.args.JsonSave(dict(meta or {}))})
    return bool(self._manager.save(step, args=args, force=True))

  def wait(self) -> None:
    """Blocks until any background save has finished writing."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for background saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restoring ------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest step: complete on disk when this Checkpointer was made, or saved through it since
    (an async save in flight counts; ``restore`` waits for it)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All kept steps, oldest first (same caveat as ``latest_step``)."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` from ``step`` (default: latest); FileNotFoundError if there is no
    (complete) checkpoint or no such step in the directory.

    ``abstract_state``: pytree matching the saved state, of ``jax.ShapeDtypeStruct`` with
    ``.sharding`` (``jax.eval_shape(init)`` + shardings, or ``abstract_like``) or of concrete arrays
    (only their shape/dtype/sharding are used). Arrays are placed with those shardings, a leaf
    without one replicated on all devices; typed-key leaves come back as typed keys of the same impl.
    """
    self.wait()
    self._manager.reload()  # pick up steps finished since (also by other processes)
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint found in {self.directory}")
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
    step = int(step)

    # a leaf without a sharding: replicated on all devices (no one device is every process's)
    default_sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)),
                                                  jax.sharding.PartitionSpec())
    abstract = abstract_like(abstract_state)
    target = jax.tree.map(
        lambda x: _key_data_abstract(x, default_sharding) if _is_typed_key(x)
        else (x if x.sharding is not None
              else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default_sharding)),
        abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
    # An abstract key's implementation has no public accessor (`jax.random.key_impl` wants a
    # concrete key): read its dtype's `_impl`.
    state = jax.tree.map(
        lambda x, a: jax.random.wrap_key_data(x, impl=a.dtype._impl) if _is_typed_key(a) else x,
        restored[_STATE], abstract)
    return state, dict(restored[_META] or {})

  def restore_latest_good(self, abstract_state) -> tuple[int, Any, dict]:
    """``(step, state, meta)`` of the newest step that restores. Each newer step that does not is
    renamed ``<step>.corrupt`` (kept for inspection; later saves of that step then happen) with a
    one-line warning. When no step restores nothing is renamed and the error is one line (a state
    that no longer matches the checkpoints fails every step, not just one)."""
    steps, errors = self.all_steps()[::-1], []
    for step in steps:
      try:
        state, meta = self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
        errors.append(e)
        continue
      for bad, e in zip(steps, errors):
        logging.getLogger("rlhfjax").warning(
            "checkpoint step %d in %s does not restore (%s); moved to %d.corrupt, resuming from step "
            "%d", bad, self.directory, _one_line(e), bad, step)
        path = epath.Path(self.directory) / str(bad)
        path.rename(path.parent / f"{bad}.corrupt")
      self._manager.reload()
      return step, state, meta
    if errors:
      raise ValueError(f"no checkpoint in {self.directory} restores (step {steps[0]}: "
                       f"{_one_line(errors[0])}); a changed model/optimizer config or damaged files")
    raise FileNotFoundError(f"no checkpoint found in {self.directory}")


def _one_line(e: Exception, n: int = 200) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"
