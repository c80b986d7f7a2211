"""Everything a run writes for humans, all inside its workdir.

- ``metrics.jsonl``: one JSON object per ``MetricsWriter.write`` — ``{"stage", "step", "time", **metrics}``
  (NaN/inf become ``null`` so every line is strict JSON).
- ``tb/``: TensorBoard events (tensorboardX, no TensorFlow), tags ``"<stage>/<key>"``.
- ``samples.jsonl``: generated samples, one row per line with ``stage``/``step`` added.
- ``plots/<stage>.png``: one figure per stage, a subplot per metric (``plot_curves``).
- ``report.md``: markdown summary with tables (``write_report``).

matplotlib and tensorboardX are imported lazily so ``import rlhfjax.metrics`` stays cheap.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
_RESERVED = ("stage", "step", "time")
_MAX_PLOT_KEYS = 12


def primary_only(fn):
  """The write gate: in a multi-process run only process 0 writes (every process calls, the others
  get None); on every writer of this module."""
  @functools.wraps(fn)
  def gated(*args, **kwargs):
    import jax  # pylint: disable=import-outside-toplevel
    return fn(*args, **kwargs) if jax.process_index() == 0 else None
  return gated


def _to_float(value) -> float:
  """Python/NumPy/JAX scalar (or size-1 array) -> float. Raises TypeError for anything else."""
  if isinstance(value, (numbers.Number, np.bool_)):  # bool is a Number
    return float(value)
  arr = np.asarray(value)  # pulls a jax.Array to host
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise TypeError(f"metric must be a scalar, got {type(value).__name__} shape={arr.shape}")
  return float(arr.reshape(()))


def _json_float(x: float) -> float | None:
  return x if math.isfinite(x) else None


def _jsonable(value):
  """Best-effort conversion of sample-row values (arrays, numpy scalars) to JSON types."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, numbers.Number):
    return _json_float(float(value)) if isinstance(value, float) else value
  if hasattr(value, "__array__"):
    arr = np.asarray(value)
    if arr.ndim == 0:
      item = arr.item()
      return _json_float(item) if isinstance(item, float) else item
    return _jsonable(arr.tolist())
  return str(value)


class MetricsWriter:
  """Appends scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

  Appending (not truncating) means a resumed run continues the same files; `rewind` first drops
  what was written after the checkpoint it resumes from, so no step appears twice.
  """

  @primary_only
  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self._metrics = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")
    self._samples = None
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # NaN/inf are written on purpose (TB shows them); don't log a warning per scalar per step.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"), flush_secs=10)

  @primary_only
  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one line ``{"stage", "step", "time", **metrics}`` and one TB scalar ``<stage>/<key>`` each.

    ``metrics``: name -> scalar (Python, NumPy or JAX; device arrays are pulled to host here, so pass
    them all at once after the step); non-finite values are ``null`` in JSON, kept in TB. Reserved
    names (``stage``, ``step``, ``time``) raise ValueError.
    """
    step = int(step)
    values = {str(k): _to_float(v) for k, v in metrics.items()}
    clash = [k for k in values if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved ({_RESERVED})")
    row = {"stage": stage, "step": step, "time": time.time(),
           **{k: _json_float(v) for k, v in values.items()}}
    self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
    self._metrics.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{stage}/{k}", v, global_step=step)

  @primary_only
  def rewind(self, stage: str, step: int, *, evals: bool = False) -> None:
    """Drops the rows of `stage` and `stage_*` (its evals, ...) after `step` from both files —
    what a run killed after its checkpoint at `step` wrote; with `evals`, the `stage_*` rows at
    `step` too (a fresh or finished stage writes them again). Files are replaced atomically."""
    def dead(r):
      label, s = r.get("stage", ""), r.get("step", 0)
      ours = label == stage or label.startswith(stage + "_")
      return ours and (s > step or (evals and s == step and label != stage))

    for name, attr in ((METRICS_FILE, "_metrics"), (SAMPLES_FILE, "_samples")):
      path = os.path.join(self.workdir, name)
      rows = _read_jsonl(path)
      if not any(dead(r) for r in rows):
        continue
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if not dead(r))
      if getattr(self, attr) is not None:
        getattr(self, attr).close()
      os.replace(path + ".tmp", path)
      setattr(self, attr, open(path, "a", encoding="utf-8"))

  @primary_only
  def write_samples(self, stage: str, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends ``rows`` (e.g. ``{"prompt", "completion", "reward"}``) to ``workdir/samples.jsonl``."""
    if self._samples is None:
      self._samples = open(os.path.join(self.workdir, SAMPLES_FILE), "a", encoding="utf-8")
    for row in rows:
      line = {"stage": stage, "step": int(step), **_jsonable(dict(row))}
      self._samples.write(json.dumps(line, allow_nan=False, ensure_ascii=False) + "\n")
    self._samples.flush()

  @primary_only
  def flush(self) -> None:
    self._metrics.flush()
    if self._samples is not None:
      self._samples.flush()
    if self._tb is not None:
      self._tb.flush()

  @primary_only
  def close(self) -> None:
    for f in (self._metrics, self._samples):
      if f is not None and not f.closed:
        f.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line.strip()))
      except json.JSONDecodeError:  # a blank line, or a torn last line from a killed run
        continue
  return rows


def read_metrics(workdir: str, stage: str | None = None) -> list[dict]:
  """All rows of ``workdir/metrics.jsonl`` (optionally one stage), in write order; null -> NaN."""
  rows = _read_jsonl(os.path.join(os.fspath(workdir), METRICS_FILE))
  return [{k: (math.nan if v is None else v) for k, v in r.items()}
          for r in rows if stage is None or r.get("stage") == stage]


def read_samples(workdir: str) -> list[dict]:
  """All rows of ``workdir/samples.jsonl``."""
  return _read_jsonl(os.path.join(os.fspath(workdir), SAMPLES_FILE))


class ProgressBar:
  """Thin tqdm wrapper showing ``step``, ``loss`` and ``tok/s``; refreshes at most once a second.
  Where tqdm is off (stderr not a TTY: logs, CI) a plain line goes to the ``rlhfjax`` logger
  instead — step, the metrics, ETA — at the first update, then at most every ``plain_every``
  seconds, and at the last step.

  ``update(step, ...)`` takes the absolute step (not an increment), so it is resume-friendly.
  """

  def __init__(self, total: int, desc: str = "", initial: int = 0, *, disable: bool | None = None,
               plain_every: float = 30.0):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    # disable=None: tqdm turns itself off when stderr is not a TTY (CI logs stay clean).
    self._bar = tqdm(total=total, desc=desc, initial=initial, mininterval=1.0, maxinterval=10.0,
                     dynamic_ncols=True, disable=disable, unit="step")
    self._step = self._initial = int(initial)
    self._plain = self._bar.disable and disable is None
    self._desc, self._total, self._every = desc, total, plain_every
    self._t0, self._last = time.monotonic(), -math.inf

  def update(self, step: int, loss=None, tokens_per_s=None, **extra) -> None:
    step = int(step)
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step
    post = {}
    if loss is not None:
      post["loss"] = f"{_to_float(loss):.4g}"
    if tokens_per_s is not None:
      post["tok/s"] = f"{_to_float(tokens_per_s):,.0f}"
    for k, v in extra.items():
      try:
        post[k] = f"{_to_float(v):.4g}"
      except TypeError:
        post[k] = str(v)
    if post:
      self._bar.set_postfix(post, refresh=False)  # shown at the next (rate-limited) refresh
    now = time.monotonic()
    if self._plain and (now - self._last >= self._every or step >= self._total):
      self._last, done = now, step - self._initial
      eta = (now - self._t0) / done * (self._total - step) if done > 0 else math.nan
      cells = " ".join(f"{k}={v}" for k, v in post.items())
      logging.getLogger("rlhfjax").info("%s step %d/%d %s eta %s", self._desc, step, self._total,
                                        cells, _duration(eta))

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _numeric_keys(rows: Iterable[dict]) -> list[str]:
  keys: dict[str, bool] = {}
  for r in rows:
    for k, v in r.items():
      if k not in _RESERVED:
        keys[k] = keys.get(k, True) and isinstance(v, (int, float)) and not isinstance(v, bool)
  return [k for k, ok in keys.items() if ok]


@primary_only
def plot_curves(workdir: str, stages: Sequence[str] | None = None) -> list[str]:
  """Plots ``metrics.jsonl`` to ``workdir/plots/<stage>.png``: a subplot per numeric metric.

  At most 12 metrics per stage (first seen first). Returns the written paths (none if no metrics).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(workdir)
  if stages is None:
    stages = list(dict.fromkeys(r["stage"] for r in rows))
  out_dir = os.path.join(os.fspath(workdir), "plots")
  paths = []
  for stage in stages:
    srows = [r for r in rows if r.get("stage") == stage]
    keys = _numeric_keys(srows)[:_MAX_PLOT_KEYS]
    if not keys:
      continue
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
      pts = sorted((r["step"], r[key]) for r in srows if key in r)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
      ax.set_title(key, fontsize=10)
      ax.set_xlabel("step", fontsize=8)
      ax.tick_params(labelsize=8)
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
      ax.axis("off")
    fig.suptitle(stage)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stage}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def _fmt_cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"  # "nan" for any NaN
  return "" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """GitHub-flavoured markdown table; columns are the union of keys in first-seen order."""
  if not rows:
    return "_(empty)_"
  cols = list(dict.fromkeys(k for r in rows for k in r))
  esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
  lines = ["| " + " | ".join(esc(str(c)) for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(esc(_fmt_cell(r.get(c))) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


@primary_only
def write_report(workdir: str, title: str, sections: Mapping[str, str | Sequence[Mapping]]) -> str:
  """Writes ``workdir/report.md``: ``# title`` then ``## name`` per section (text or a table of
  dict rows). Plots in ``workdir/plots`` are linked at the end. Returns the path."""
  parts = [f"# {title}", ""]
  for name, body in sections.items():
    parts += [f"## {name}", "", body if isinstance(body, str) else markdown_table(list(body)), ""]
  plots_dir = os.path.join(os.fspath(workdir), "plots")
  if os.path.isdir(plots_dir):
    pngs = sorted(p for p in os.listdir(plots_dir) if p.endswith(".png"))
    if pngs:
      parts += ["## Plots", ""] + [f"![{p[:-4]}](plots/{p})" for p in pngs] + [""]
  path = os.path.join(os.fspath(workdir), "report.md")
  os.makedirs(os.fspath(workdir), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path


def _clip(s: str, n: int) -> str:
  s = s.replace("\n", "⏎")
  return s if len(s) <= n else s[: max(0, n - 1)] + "…"


def samples_table(rows: Sequence[Mapping[str, Any]], max_rows: int = 8, max_chars: int = 80) -> str:
  """Plain-text table for the console: at most ``max_rows`` rows, cells clipped to ``max_chars``
  (with ``…``), newlines shown as ``⏎``; a footer says how many rows were left out."""
  if not rows:
    return "(no samples)"
  cols = list(dict.fromkeys(k for r in rows for k in r))
  shown = [[_clip(_fmt_cell(r.get(c)), max_chars) for c in cols] for r in rows[:max_rows]]
  header = [_clip(str(c), max_chars) for c in cols]
  widths = [max(len(header[i]), *(len(row[i]) for row in shown)) for i in range(len(cols))]
  fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  lines = [fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in shown]
  if len(rows) > max_rows:
    lines.append(f"... ({len(rows) - max_rows} more rows)")
  return "\n".join(lines)
