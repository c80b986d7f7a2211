"""The one host loop: a `Stage` declares its state, step, eval and result; `run_stage` drives it.

The driver owns what stages share: resume from the stage's latest checkpoint (state, data
position, the "before" eval) or init; metrics every `log_every` (one device->host transfer per
interval), eval every `eval_every`, checkpoints every `checkpoint_every` and a final one after
`finalize` (a checkpoint at `total_steps` is always final); finite checks before any save;
throughput, progress bar, writer; the result dict (`before_<k>` / `after_<k>` + the stage's own).

Robustness: a resume restores the newest checkpoint that restores
(`Checkpointer.restore_latest_good`) and drops the metrics rows written after it
(`MetricsWriter.rewind`). Inside `stop_on_signals()` (around setup and stages in
`train_and_evaluate`) SIGINT/SIGTERM only set a flag; the loop reads it at step boundaries
(`stop_requested`; several processes agree on it at log boundaries), checkpoints that step and
raises `Interrupted`.

Adding a stage: subclass `Stage`, implement the hooks, `@register_stage("name")`, and import its
module in `rlhfjax.train.pipeline.STAGE_MODULES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

import ml_collections
import numpy as np

log = logging.getLogger("rlhfjax")


@dataclasses.dataclass
class Run:
  """What every stage of one `train_and_evaluate` shares."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  model_cfg: Any  # TransformerConfig of the run's built-in transformer
  mesh: Any
  rules: tuple
  writer: Any  # rlhfjax.metrics.MetricsWriter
  train_examples: Any
  test_examples: Any
  results: dict = dataclasses.field(default_factory=dict)  # stage -> summary numbers
  params: dict = dataclasses.field(default_factory=dict)  # stage -> final parameters

  def ckpt_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, "checkpoints", stage)

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  def base_params(self):
    """The pretrained policy `config.model.hf_path` names (read once, onto the mesh), or None."""
    path = self.config.model.get("hf_path", "")
    if path and "base" not in self.params:
      from rlhfjax.models.hf import load_hf
      _, self.params["base"] = load_hf(path, dtype=self.model_cfg.param_dtype, mesh=self.mesh,
                                       rules=self.rules)
    return self.params.get("base")


class Stage:
  """A training stage. `__init__` only reads config (cheap: `stage_params` builds stages to read
  their checkpoints); the hooks do the work. Cadence attributes are set by subclasses."""

  name: str = ""
  total_steps: int = 0
  log_every: int = 1
  eval_every: int = 0  # 0 = before and after only
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  finite_keys: tuple[str, ...] = ("loss",)  # metrics that must be finite before any save
  rate_name: str | None = None  # throughput metric of the step's `units` (e.g. "tokens_per_s")
  progress_keys: tuple[str, ...] = ("loss",)  # metrics shown on the progress bar
  samples_name: str | None = None  # samples.jsonl stage of the final eval's samples (None: <name>_eval)

  def __init__(self, run: Run):
    self.run = run
    self.meta: dict = {}  # the checkpoint meta (set by the driver)
    self.data = None  # the stage's DataIterator, if it has one

  @classmethod
  def check_config(cls, config) -> None:
    """Reject the stage's bad config (unknown keys, names) with one line, before any data is built."""

  # -- state
  def state_spec(self) -> tuple[Any, Any]:
    """(abstract state, its shardings) for restoring a checkpoint."""
    raise NotImplementedError

  def init_state(self) -> Any:
    """A fresh sharded state (called only when the stage has no checkpoint)."""
    raise NotImplementedError

  def params_of(self, state) -> Any:
    """The parameters later stages take from this one."""
    return state.params

  # -- the loop
  def prepare(self) -> None:
    """Work needed before init or resume (data, labels, ...). Called once."""

  def start(self, state) -> None:
    """Compile the steps, build iterators; called once the state exists (fresh or restored)."""

  def host_state(self) -> Any:
    """Host-side state the checkpoint carries besides the device state (JSON): by default the
    position of `self.data` (a `DataIterator`), if any. Restored with `set_host_state`."""
    return self.data.get_state() if self.data is not None else None

  def set_host_state(self, host_state) -> None:
    if self.data is not None:
      self.data.set_state(host_state)

  def step(self, state, step: int) -> tuple[Any, dict, float | None]:
    """One step `step` (1-based): (new state, metrics — device arrays welcome —, this process's
    work units)."""
    raise NotImplementedError

  def check(self, step: int, metrics: dict) -> None:
    """Host metrics of each step, at log boundaries (once they are written): raise `StopRun` to
    stop the run with one line."""

  def finalize(self, state) -> tuple[Any, dict]:
    """After the last step, before the final checkpoint: (state, extra checkpoint meta)."""
    return state, {}

  # -- evaluation and results
  def evaluate(self, state) -> tuple[dict, list]:
    """(scalar metrics, sample rows) on held-out data."""
    return {}, []

  def initial_extras(self) -> dict:
    """Scalars logged with the first eval and added to the result (e.g. the teacher's accuracy)."""
    return {}

  def result(self, state, result: dict) -> dict:
    """The stage's own numbers added to `before_*` / `after_*` (`result`, modified in place);
    `self.meta` is the final checkpoint's meta."""
    return result


STAGES: dict[str, type[Stage]] = {}


def register_stage(name: str):
  def deco(cls: type[Stage]):
    cls.name = name
    STAGES[name] = cls
    return cls
  return deco


class Throughput:
  """Work units per second between calls (host wall time)."""

  def __init__(self):
    self.t, self.units = time.perf_counter(), 0.0

  def add(self, units: float):
    self.units += units

  def rate(self) -> float:
    now = time.perf_counter()
    r = self.units / max(now - self.t, 1e-9)
    self.t, self.units = now, 0.0
    return float(r)


class StopRun(Exception):
  """A run stopped on purpose: `main` prints the message as one line and exits with `code`."""

  code = 2


class Interrupted(StopRun):
  """SIGINT/SIGTERM: the stage checkpointed and stopped; exit code 128 + signal (130 / 143)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.code = 128 + signum


_received: list[int] = []  # signals received inside `stop_on_signals`


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT/SIGTERM set a flag for `run_stage` instead of stopping the process; a second signal
  acts as it would without this (handlers restored). No-op outside the main thread and for an
  ignored signal."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
         if signal.getsignal(s) is not signal.SIG_IGN}  # e.g. nohup: stays ignored

  def restore():
    for s, handler in old.items():
      signal.signal(s, handler)

  def on_signal(signum, frame):
    _received.append(signum)
    restore()
  for s in old:
    signal.signal(s, on_signal)
  try:
    yield
  finally:
    restore()
    _received.clear()


def stop_requested() -> int | None:
  """The signal that asked the run to stop, if any: checked at step boundaries. In a multi-process
  run every process calls it at the same points and gets the same answer (a signal reaching any one
  of them stops them all at that step)."""
  from rlhfjax.parallel.distributed import process_max
  return process_max(_received[0] if _received else 0) or None


def _interrupted(name: str, signum: int, step: int | None, ckpt_dir: str) -> Interrupted:
  where = f"checkpoint {os.path.join(ckpt_dir, str(step))} (step {step})" if step is not None else \
      "no new checkpoint"
  return Interrupted(f"{name}: stopped by {signal.Signals(signum).name}; {where}", signum)


def check_finite(values: dict, stage: str, step: int, last_good: int | None, ckpt_dir: str):
  """Stop on a non-finite loss with one line naming the step and the last good checkpoint."""
  for k, v in values.items():
    if not np.all(np.isfinite(np.asarray(v))):
      where = f"step {last_good} in {ckpt_dir}" if last_good is not None else "none saved yet"
      raise FloatingPointError(f"{stage}: non-finite {k} at step {step}; stopped without saving; "
                               f"last good checkpoint: {where}")


def _average(host: list[dict]) -> dict:
  return {k: float(np.mean([np.mean(m[k]) for m in host])) for k in host[-1]}


def run_stage(run: Run, stage: Stage) -> dict:
  """Resume or init `stage`, train it to `total_steps`, evaluate; returns its result dict."""
  import jax

  from rlhfjax.checkpoint import Checkpointer, abstract_like
  from rlhfjax.metrics import ProgressBar
  name = stage.name
  if signum := stop_requested():  # e.g. during the data set build
    raise _interrupted(name, signum, None, run.ckpt_dir(name))
  stage.prepare()
  total = stage.total_steps  # prepare may size the stage (e.g. epochs over the data it built)
  ckpt_dir = run.ckpt_dir(name)
  # closing waits for in-flight async saves, also when training stops on an error (NaN)
  with Checkpointer(ckpt_dir, max_to_keep=stage.keep_checkpoints) as ckpt:
    start, resumed = 0, ckpt.latest_step() is not None
    if resumed:
      abstract, shardings = stage.state_spec()
      start, state, meta = ckpt.restore_latest_good(abstract_like(abstract, shardings))
      stage.set_host_state(meta.get("data"))
      log.info("%s: resumed at step %d in %s", name, start, ckpt_dir)
    finished = resumed and start >= total
    # rows written after the restored step are written again (a fresh or finished stage also
    # rewrites its evals at that step)
    run.writer.rewind(name, start, evals=finished or not resumed)
    if not resumed:
      state = stage.init_state()
      before, _ = stage.evaluate(state)
      extras = stage.initial_extras()
      meta = {"before": before, "extras": extras}
      run.writer.write(f"{name}_eval", 0, {**before, **extras})
    stage.meta = meta
    stage.start(state)
    if (signum := stop_requested()) and not finished:
      raise _interrupted(name, signum, ckpt.latest_step(), ckpt_dir)

    if not finished:
      bar = ProgressBar(total, name, initial=start)
      speed = Throughput()
      pending: list = []
      last_good = ckpt.latest_step()
      for step in range(start + 1, total + 1):
        state, metrics, units = stage.step(state, step)
        pending.append(metrics)
        if units is not None:
          speed.add(units * jax.process_count())  # units: this process's rows
        # one process: every step; several agree at log boundaries, where the loop syncs anyway
        signum = stop_requested() if jax.process_count() == 1 or step % stage.log_every == 0 else None
        save = (step % stage.checkpoint_every == 0 or signum) and step < total
        if step % stage.log_every == 0 or save or step == total:  # one transfer per interval
          host = jax.device_get(pending)
          pending = []
          for i, m in enumerate(host):
            check_finite({k: m[k] for k in stage.finite_keys if k in m}, name,
                         step - len(host) + 1 + i, last_good, ckpt_dir)
          avg = _average(host)
          if stage.rate_name:
            avg[stage.rate_name] = speed.rate()
          run.writer.write(name, step, avg)
          for i, m in enumerate(host):
            stage.check(step - len(host) + 1 + i, m)
          bar.update(step, **{k: avg[k] for k in stage.progress_keys if k in avg})
        if stage.eval_every and step % stage.eval_every == 0 and step < total:
          run.writer.write(f"{name}_eval", step, stage.evaluate(state)[0])
        if save:
          ckpt.save(step, state, {**meta, "data": stage.host_state(), "stage": name}, force=True)
          last_good = step
        if signum and step < total:
          bar.close()
          ckpt.wait()
          raise _interrupted(name, signum, step, ckpt_dir)
      bar.close()
      state, extra_meta = stage.finalize(state)
      meta.update(extra_meta)
      ckpt.save(total, state, {**meta, "data": stage.host_state(), "stage": name, "finished": True},
                force=True)

  after, samples = stage.evaluate(state)
  run.writer.write(f"{name}_eval", total, after)
  if samples:
    run.writer.write_samples(stage.samples_name or f"{name}_eval", total, samples)
  run.params[name] = stage.params_of(state)
  result = {f"before_{k}": v for k, v in meta.get("before", {}).items()}
  result.update({f"after_{k}": v for k, v in after.items()})
  result.update(meta.get("extras", {}))
  return stage.result(state, result)


def stage_params(run: Run, name: str):
  """Final parameters of an earlier stage: from this process, or restored from its final
  checkpoint in the workdir (a one-line error when that stage has not finished there)."""
  if name in run.params:
    return run.params[name]
  from rlhfjax.checkpoint import Checkpointer, abstract_like
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; valid: {sorted(STAGES)}")
  stage = STAGES[name](run)
  ckpt_dir = run.ckpt_dir(name)
  with Checkpointer(ckpt_dir) as ckpt:
    step = ckpt.latest_step()
    skipped = name == "sft" and name not in [s.strip() for s in str(run.config.stages).split(",")]
    if step is None and skipped and run.base_params() is not None:
      log.info("no sft stage: the policy starts from %s", run.config.model.hf_path)
      run.params[name] = run.base_params()
      return run.params[name]
    if step is None:
      raise FileNotFoundError(f"this stage needs the '{name}' stage's parameters: none in this run "
                              f"and no checkpoint in {ckpt_dir}; put '{name}' before it in "
                              "config.stages")
    abstract, shardings = stage.state_spec()
    step, state, meta = ckpt.restore_latest_good(abstract_like(abstract, shardings))
  if not (meta.get("finished") or meta.get("normalized") or 0 < stage.total_steps <= step):
    raise ValueError(f"the '{name}' stage in {run.workdir} has not finished (latest checkpoint: "
                     f"step {step}); put '{name}' before it in config.stages to complete it")
  log.info("%s parameters from step %d of %s", name, step, ckpt_dir)
  run.params[name] = stage.params_of(state)
  return run.params[name]
