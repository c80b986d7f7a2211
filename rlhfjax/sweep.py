"""Sweeps: one workdir per point of an experiment's `get_sweep()`, run or submitted, then a table and a plot.

    python -m rlhfjax.sweep --config=grpo_arith --root=/tmp/sweep                 # runs here, in turn
    python -m rlhfjax.sweep --config=grpo_arith --root=/tmp/sweep --dry-run       # the commands only
    python -m rlhfjax.sweep --config=grpo_arith --root=gs://b/sweep --launch=tpu_vm   # one job per point

`get_sweep()` (beside `get_config()` in the experiment file) returns a list of override dicts,
`{"rl_optim.learning_rate": 1e-5, "seed": 1}`, usually built with `product` and `zip_`. Point
`{k: v}` is `python -m rlhfjax.main --config=FILE --workdir=ROOT/<name> --config.k=v ...` with
`name = point_name(point)`; every point's overrides are parsed as `rlhfjax.main` parses them
(`config.parse_config`) before anything runs. `--launch=local` runs the points one after another
and skips a finished one (its `results.json` exists; an unfinished one resumes);
`tpu_vm` / `slurm` pass each point's arguments to `launch/tpu_vm.sh -- ARGS` (one slice per point,
created and deleted in turn) / `launch/slurm.sbatch -- ARGS` (one job per point, all submitted);
under `--dry-run` those scripts print their own commands.
Then `ROOT/sweep.md` and `ROOT/sweep.csv` get one row per point (its overrides, status and the
scalars of its `results.json` as `stage.key`, or the last logged value of `--metric` in
`metrics.jsonl`) and `ROOT/sweep.png` plots `--metric` across the points.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

from rlhfjax.config import import_sibling, parse_config, resolve_config_arg

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
LAUNCHERS = {"local": None, "tpu_vm": "tpu_vm.sh", "slurm": "slurm.sbatch"}  # --launch -> launch/ script


def _points(part) -> list[dict]:
  return list(part) if isinstance(part, (list, tuple)) else \
      [dict(zip(part, values)) for values in itertools.product(*part.values())]


def product(*parts) -> list[dict]:
  """Every combination of `parts`, each an axes dict `{key: [values]}` (itself a product) or a list
  of points: `product(zip_({"a": [1, 2], "b": [3, 4]}), {"seed": [0, 1]})` is 4 points."""
  return [{k: v for point in combo for k, v in point.items()}
          for combo in itertools.product(*map(_points, parts))]


def zip_(axes: dict) -> list[dict]:
  """Axes stepped together: `zip_({"a": [1, 2], "b": [3, 4]})` = [{a: 1, b: 3}, {a: 2, b: 4}]."""
  if len({len(v) for v in axes.values()}) > 1:
    raise ValueError(f"zip_: axes of different lengths {({k: len(v) for k, v in axes.items()})}")
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def point_name(point: dict) -> str:
  """The point's workdir name: `rl_optim.learning_rate=1e-05_seed=1` (`base` for no overrides)."""
  return "_".join(f"{k}={v}".replace("/", "-").replace(" ", "") for k, v in point.items()) or "base"


def point_args(config_path: str, root: str, point: dict) -> list[str]:
  """`rlhfjax.main`'s arguments for one point."""
  return [f"--config={config_path}", f"--workdir={os.path.join(root, point_name(point))}",
          *(f"--config.{k}={v}" for k, v in point.items())]


def command(launch: str, args: list[str], dry_run: bool = False) -> list[str]:
  """The command that runs (`local`) or submits one point; a `launch/` script prints its own
  commands under `--dry-run`."""
  if launch == "local":
    return [sys.executable, "-m", "rlhfjax.main", *args]
  return ["bash", os.path.join(LAUNCH_DIR, LAUNCHERS[launch]), *(["--dry-run"] if dry_run else []), "--", *args]


def load_sweep(config_arg: str) -> list[dict]:
  """The `get_sweep()` points of experiment `config_arg`, each checked by parsing it as `main` would."""
  path = resolve_config_arg(config_arg).partition(":")[0]
  module = import_sibling(path, os.path.splitext(os.path.basename(path))[0])
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} has no get_sweep()")
  points = list(module.get_sweep())
  names = [point_name(p) for p in points]
  if len(set(names)) < len(names):
    raise ValueError(f"get_sweep() of {path} repeats points: {sorted(n for n in names if names.count(n) > 1)}")
  for point in points:
    args = point_args(config_arg, "", point)
    parse_config([args[0], *args[2:]])
  return points


def _flat(results: dict) -> dict:
  return {f"{stage}.{k}": v for stage, r in results.items() for k, v in r.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def point_row(workdir: str, point: dict, metric: str) -> dict:
  """One table row: the point's overrides, its status and its final numbers."""
  from rlhfjax.metrics import read_metrics
  row = {"point": os.path.basename(workdir), **point}
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      row.update(status="done", **_flat(json.load(f)))
  else:
    row["status"] = "running" if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else "pending"
  if metric and metric not in row and "." in metric:
    stage, key = metric.split(".", 1)
    logged = [r[key] for r in read_metrics(workdir, stage) if key in r] if os.path.isdir(workdir) else []
    if logged:
      row[metric] = logged[-1]
  return row


def plot(rows: list[dict], keys: list[str], metric: str, path: str) -> None:
  """`metric` against the first varying override key, one line per value of the others."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1] or keys[:1]
  x_key, rest = (varying[0], varying[1:]) if varying else ("point", [])
  lines: dict[tuple, list] = {}
  for r in rows:
    if isinstance(r.get(metric), (int, float)):
      lines.setdefault(tuple(r.get(k) for k in rest), []).append((r.get(x_key), r[metric]))
  fig, ax = plt.subplots(figsize=(6, 4))
  numeric = all(isinstance(x, (int, float)) for pts in lines.values() for x, _ in pts)
  for group, pts in lines.items():
    pts = sorted(pts) if numeric else [(str(x), y) for x, y in pts]
    label = ", ".join(f"{k}={v}" for k, v in zip(rest, group)) or None
    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
  xs = [x for pts in lines.values() for x, _ in pts]
  if numeric and xs and min(xs) > 0 and max(xs) >= 100 * min(xs):
    ax.set_xscale("log")
  ax.set(xlabel=x_key, ylabel=metric, title=os.path.basename(os.path.dirname(path)))
  ax.grid(alpha=0.3)
  if rest:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_table(root: str, points: list[dict], metric: str) -> list[dict]:
  """`root/sweep.md`, `root/sweep.csv` and (with any value of `metric`) `root/sweep.png`."""
  from rlhfjax.metrics import markdown_table
  rows = [point_row(os.path.join(root, point_name(p)), p, metric) for p in points]
  keys = list(dict.fromkeys(k for p in points for k in p))
  after = [k for r in rows for k in r if ".after_" in k]
  if not metric and after:  # default: the first after_* number of the last stage
    metric = next(k for k in after if k.split(".")[0] == after[-1].split(".")[0])
  cols = list(dict.fromkeys(["point", *keys, "status", *([metric] if metric else []),
                             *(k for r in rows for k in r)]))
  rows = [{c: r.get(c) for c in cols} for r in rows]
  short = [c for c in cols if c in ("point", "status", metric) or c in keys or ".after_" in c]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.md"), "w") as f:  # the after_* numbers; the CSV has them all
    f.write(f"# sweep: {metric or 'no metric yet'}\n\n{markdown_table([{c: r[c] for c in short} for r in rows])}\n")
  with open(os.path.join(root, "sweep.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
  if metric and any(isinstance(r.get(metric), (int, float)) for r in rows):
    plot(rows, keys, metric, os.path.join(root, "sweep.png"))
  return rows


def sweep(config_arg: str, root: str, *, launch: str = "local", dry_run: bool = False,
          metric: str = "") -> int:
  """Run / submit (or with `dry_run` print) every point of `config_arg`'s sweep, then write the
  table. Returns the number of points that failed (local) or could not be submitted."""
  points, failed = load_sweep(config_arg), 0
  for point in points:
    cmd = command(launch, point_args(config_arg, root, point), dry_run)
    if launch == "local" and os.path.exists(os.path.join(root, point_name(point), "results.json")):
      print(f"sweep: {point_name(point)} finished, skipped", flush=True)
    elif dry_run and launch == "local":
      print(shlex.join(cmd), flush=True)
    else:
      print(f"sweep: {shlex.join(cmd)}", flush=True)
      failed += subprocess.run(cmd, check=False).returncode != 0
  if not dry_run and "://" not in root:
    write_table(root, points, metric)
    print(f"sweep: {len(points)} points, {failed} failed; table {os.path.join(root, 'sweep.md')}", flush=True)
  return failed


def _cli():
  """`python -m rlhfjax.sweep` (flags defined here: experiment files import this module under `main`)."""
  flags.DEFINE_string("config", None, "experiment name or file with get_config() and get_sweep()")
  flags.DEFINE_string("root", None, "directory of the points' workdirs and the table")
  flags.DEFINE_enum("launch", "local", list(LAUNCHERS), "where the points run")
  flags.DEFINE_bool("dry-run", False, "print the commands, run nothing")
  flags.DEFINE_string("metric", "", "stage.key to tabulate and plot (default: the first after_*)")
  flags.mark_flags_as_required(["config", "root"])
  f = flags.FLAGS
  app.run(lambda _: sys.exit(min(sweep(f.config, f.root, launch=f.launch, dry_run=f["dry-run"].value,
                                       metric=f.metric), 1)))


if __name__ == "__main__":
  _cli()
