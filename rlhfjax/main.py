"""Command-line entry: flags -> `train_and_evaluate(config, workdir)` -> a summary of what it achieved.

    python -m rlhfjax.main --config=exceed_teacher --workdir=/tmp/rlhfjax_demo    # make demo, part 1
    python -m rlhfjax.main --config=preference --workdir=/tmp/pref --config.stages=sft,rm
    python -m rlhfjax.main --config=experiments/arithmetic.py --workdir=/tmp/arith --config.sft.steps=300

`--config` is an experiment name (a file of `experiments/`, shipped in a wheel as
`rlhfjax.experiments`; `NAME:ARG` passes ARG to its `get_config`) or the path of any file with a
`get_config()`. `--config.a.b=v` overrides one field (a typo is an error naming the valid keys).
Re-running on the same workdir resumes; a finished workdir just prints its summary again.

Ctrl-C / SIGTERM: the current step finishes, a checkpoint is saved, one line names it and the
command that resumes, and the exit code is 128 + the signal (130 / 143); a second signal stops at
once. Bad input and a run stopped on purpose (failing rewards, non-finite updates) print one
`error:` line on stderr and exit 2.
"""

from __future__ import annotations

import ast
import logging
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from rlhfjax.config import resolve_argv

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment name (e.g. exceed_teacher) or config file path (get_config())",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (re-running the same command resumes)")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (rlhfjax.parallel.distributed.initialize): auto-detected on Cloud TPU VMs, GKE
# and SLURM; these flags otherwise, the same on every process but --process_id.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "processes in the run (1: a single one, even in a cluster)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")

# TFDS warns about these on every load of our (deliberately custom, unregistered) builder config.
_EXPECTED_WARNINGS = ("Using custom data configuration", "has no dataset_info.json")


def _quiet():
  """INFO from TFDS / Orbax / absl off (and TFDS's expected warnings); rlhfjax's own progress stays."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").addFilter(
      lambda rec: not any(s in rec.getMessage() for s in _EXPECTED_WARNINGS))
  log = logging.getLogger("rlhfjax")
  log.setLevel(logging.INFO)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("rlhfjax: %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # a root handler installed by a dependency would print each line twice


def _title(config_path: str) -> str:
  """Summary header: the experiment's name and the first line of its file's docstring."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  try:
    with open(config_path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError, ValueError):
    doc = ""
  first = doc.strip().splitlines()[0] if doc.strip() else ""
  return f"rlhfjax {name}: {first}" if first else f"rlhfjax {name}"


def main(argv):
  del argv
  from rlhfjax.parallel.distributed import initialize
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any JAX computation
  _quiet()
  from rlhfjax.config import get_field
  from rlhfjax.summary import summary
  from rlhfjax.train.pipeline import train_and_evaluate
  config, workdir = _CONFIG.value, _WORKDIR.value
  print(f"rlhfjax: stages={get_field(config, 'stages', '?')} workdir={workdir} (a fresh run builds the "
        "data set and tokenizer, then trains)", flush=True)
  t0 = time.perf_counter()
  results = train_and_evaluate(config, workdir)
  title = _title(config_flags.get_config_filename(flags.FLAGS["config"]))
  print(summary(results, workdir, time.perf_counter() - t0, title=title), flush=True)


def run():
  """Console-script entry point; bad input (config keys, experiment names) exits with one line instead
  of a traceback."""
  from rlhfjax.train.stage import Interrupted, StopRun
  resume = shlex.join(["python", "-m", "rlhfjax.main", *sys.argv[1:]])
  try:
    sys.argv = resolve_argv(sys.argv)  # config_flags reads the overrides from sys.argv itself
    app.run(main)
  except Interrupted as e:
    print(f"rlhfjax: {e}; resume: {resume}", file=sys.stderr)
    sys.exit(e.code)
  except KeyboardInterrupt:
    print("rlhfjax: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
    sys.exit(130)
  except (ValueError, KeyError, AttributeError, OSError, FloatingPointError, StopRun) as e:
    msg = str(e.args[0] if len(e.args) == 1 else e)
    if msg[:1] in "'\"":  # ml_collections hands us a repr'd message
      try:
        msg = ast.literal_eval(msg)
      except (ValueError, SyntaxError):
        pass
    msg = " ".join(str(msg).split())  # one line
    if isinstance(e, (KeyError, AttributeError)):
      msg = f"unknown config key {msg}"
    print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
