"""Command-line entry: flags -> `train_and_evaluate(config, workdir)`.

    python -m rlhfjax.main --config=experiments/arithmetic.py --workdir=/tmp/arith --config.sft.steps=300
"""

from __future__ import annotations

import ast
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (get_config())",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (re-running the same command resumes)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from absl import logging as absl_logging
  from rlhfjax.train.pipeline import train_and_evaluate
  absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS / Orbax are chatty at INFO
  logging.getLogger("rlhfjax").setLevel(logging.INFO)
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  for stage, res in results.items():
    print(f"[{stage}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in res.items()))
  print(f"workdir: {_WORKDIR.value}")


def run():
  """Console-script entry point; bad config keys exit with one line instead of a traceback."""
  try:
    app.run(main)
  except (ValueError, KeyError, AttributeError, FileNotFoundError, FloatingPointError) as e:
    msg = str(e.args[0] if e.args else e)
    if msg[:1] in "'\"":  # ml_collections hands us a repr'd message
      try:
        msg = ast.literal_eval(msg)
      except (ValueError, SyntaxError):
        pass
    msg = " ".join(msg.split())  # one line
    if isinstance(e, (KeyError, AttributeError)):
      msg = f"unknown config key {msg}"
    print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
