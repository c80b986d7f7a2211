"""`make demo`: the arithmetic pipeline end to end, then a short summary of what it achieved.

    python -m rlhfjax.demo --workdir=/tmp/rlhfjax_demo [--stages=sft,rl] [--set sft.steps=100 ...]
    python -m rlhfjax.demo --config=experiments/arithmetic.py --stages=sft   # SFT on a correct teacher

Runs `train_and_evaluate` with `experiments/exceed_teacher.py`'s config by default: a ~0.3M-parameter
policy learns 2-digit addition with a scratchpad by imitating a teacher that usually forgets the
carry out of the tens column (`sft`), then RL with the math verifier (GRPO) trains it past that
teacher (`rl`); about 6 minutes on 2 CPU cores. Re-running on the same workdir resumes, and a
finished workdir just prints its summary again.

Adding a stage to the demo is one entry in `SUMMARIES` (stage -> function printing its results).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import time
from typing import Callable

# Stage -> printer of that stage's result dict (keys as returned by `train_and_evaluate`).
SummaryFn = Callable[[dict], list[str]]


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * float(x):5.1f}%"


def _num(x) -> str:
  return "n/a" if x is None else f"{float(x):.4f}"


def summarize_sft(r: dict) -> list[str]:
  rows = [("", "before SFT", "after SFT"),
          ("held-out accuracy (greedy)", _pct(r.get("before_accuracy_greedy")),
           _pct(r.get("after_accuracy_greedy"))),
          ("held-out accuracy (sampled)", _pct(r.get("before_accuracy_sampled")),
           _pct(r.get("after_accuracy_sampled"))),
          ("held-out loss (nats/token)", _num(r.get("before_heldout_loss")),
           _num(r.get("after_heldout_loss")))]
  w = max(len(a) for a, _, _ in rows)
  lines = [f"SFT ({r.get('steps', '?')} steps)"]
  lines += [f"  {a:<{w}}  {b:>10}  {c:>10}" for a, b, c in rows]
  return lines


def summarize_rl(r: dict) -> list[str]:
  """Teacher vs policy before RL (= after SFT) vs after RL, on the same held-out problems."""
  k = next((key.split("@")[1] for key in r if key.startswith("after_pass@")), None)
  keys = [("held-out accuracy (greedy)", "accuracy_greedy"),
          ("  on the teacher's weak class", "accuracy_greedy_flaw_class"),
          ("  on the rest", "accuracy_greedy_other"),
          ("held-out accuracy (sampled)", "accuracy_sampled")]
  if k:
    keys += [(f"pass@{k}", f"pass@{k}"), (f"maj@{k}", f"maj@{k}")]
  teacher = {"accuracy_greedy": r.get("teacher_accuracy"),
             "accuracy_greedy_flaw_class": r.get("teacher_accuracy_flaw_class"),
             "accuracy_greedy_other": r.get("teacher_accuracy_other")}
  rows = [("", "teacher", "before RL", "after RL")]
  rows += [(name, _pct(teacher[key]) if key in teacher else "", _pct(r.get(f"before_{key}")),
            _pct(r.get(f"after_{key}"))) for name, key in keys]
  w = max(len(row[0]) for row in rows)
  lines = [f"RL ({r.get('algo', '?')}, {r.get('iterations', '?')} iterations, math verifier reward)"]
  lines += [f"  {a:<{w}}  {b:>10}  {c:>10}  {d:>10}" for a, b, c, d in rows]
  if r.get("teacher_accuracy") is not None and r.get("after_accuracy_greedy") is not None:
    gain = 100 * (r["after_accuracy_greedy"] - r["teacher_accuracy"])
    lines.append(f"  RL vs teacher (greedy): {gain:+.1f} points")
  return lines


def summarize_rm(r: dict) -> list[str]:
  """Held-out agreement of the reward model with the noisy labels and the noiseless gold preference."""
  lines = [f"Reward model ({r.get('train_records', '?')} {r.get('format', 'pairs')} from the simulated "
           f"human, {r.get('steps', '?')} steps)"]
  rows = [("", "before", "after"),
          ("held-out pairs: agrees with the labels", _pct(r.get("before_accuracy")),
           _pct(r.get("after_accuracy"))),
          ("held-out pairs: agrees with gold (noiseless)", _pct(r.get("before_gold_accuracy")),
           _pct(r.get("after_gold_accuracy")))]
  for split, name in (("style", "work shown / repetition / padding"),
                      ("no_answer", "answer given vs not"), ("correctness", "right vs wrong answer")):
    if r.get(f"after_gold_pairs_{split}"):
      rows.append((f"  pairs differing in {name} ({r[f'after_gold_pairs_{split}']})",
                   _pct(r.get(f"before_gold_accuracy_{split}")),
                   _pct(r.get(f"after_gold_accuracy_{split}"))))
  w = max(len(a) for a, _, _ in rows)
  lines += [f"  {a:<{w}}  {b:>8}  {c:>8}" for a, b, c in rows]
  if r.get("after_labeler_gold_agreement") is not None:
    lines.append(f"  (the noisy labeler itself agrees with gold on "
                 f"{_pct(r['after_labeler_gold_agreement']).strip()} of those pairs)")
  return lines


def summarize_ppo(r: dict) -> list[str]:
  """Gold (simulated human) and proxy (reward model) scores before and after PPO, and the KL."""
  lines = [f"PPO against the reward model ({r.get('iterations', '?')} iterations)"]
  rows = [("", "before", "after"),
          ("gold score (simulated human)", _num(r.get("before_gold_mean")), _num(r.get("after_gold_mean"))),
          ("proxy score (reward model)", _num(r.get("before_proxy_mean")), _num(r.get("after_proxy_mean")))]
  w = max(len(a) for a, _, _ in rows)
  lines += [f"  {a:<{w}}  {b:>8}  {c:>8}" for a, b, c in rows]
  if r.get("gold_gain_in_sft_std") is not None:
    lines.append(f"  gold gain: {r['gold_gain_in_sft_std']:+.2f} SFT standard deviations")
  if r.get("kl_seq_mean") is not None:
    lines.append(f"  final KL(policy || SFT): {r['kl_seq_mean']:.2f} nats (target {r.get('kl_target')})")
  return lines


SUMMARIES: dict[str, SummaryFn] = {
    "sft": summarize_sft,
    "rm": summarize_rm,
    "rl": summarize_rl,
    "ppo": summarize_ppo,
}
STAGES = list(SUMMARIES)  # stages the demo knows how to summarize, in pipeline order


def _generic(stage: str, r: dict) -> list[str]:
  return [f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in r.items())]


def _apply_override(config, assignment: str):
  """`sft.steps=100` -> config.sft.steps = 100 (value parsed as a Python literal when possible)."""
  key, sep, raw = assignment.partition("=")
  if not sep:
    raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.strip().split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value  # a locked ConfigDict rejects unknown keys and wrong types


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
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()


DEFAULT_CONFIG = "experiments/exceed_teacher.py"


def load_config(path: str = DEFAULT_CONFIG):
  """`get_config()` of an experiment file (relative paths resolve against the repository root)."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  full = path if os.path.isabs(path) else os.path.join(root, path)
  spec = importlib.util.spec_from_file_location("rlhfjax_demo_config", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def summary(results: dict, workdir: str, wall_s: float) -> str:
  lines = ["", "=" * 60, "rlhfjax demo: arithmetic (2-digit addition with a scratchpad)", "=" * 60]
  if "rm" in results:
    lines.append("task: the simulated human prefers correct answers that show their work and dislikes "
                 "padding and repetition (rlhfjax/data/labeler.py)")
  if "rl" in results and results["rl"].get("teacher_accuracy") is not None:
    lines.append(f"the teacher's own held-out accuracy: {_pct(results['rl']['teacher_accuracy'])}")
  for stage, r in results.items():
    lines += SUMMARIES.get(stage, lambda r, s=stage: _generic(s, r))(r)
  lines += [f"wall time: {wall_s / 60:.1f} min ({wall_s:.0f} s)",
            f"workdir:   {workdir}",
            f"  report:  {os.path.join(workdir, 'report.md')}",
            f"  plots:   {os.path.join(workdir, 'plots')}/",
            f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}  (samples.jsonl, results.json beside it)"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/rlhfjax_demo", help="run directory (re-running resumes)")
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment file with get_config()")
  parser.add_argument("--stages", default="sft,rl", help=f"comma-separated, any of {STAGES}")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set sft.steps=100 (repeatable)")
  args = parser.parse_args(argv)
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    parser.error(f"--stages: unknown {unknown}; valid: {STAGES}")

  _quiet()
  config = load_config(args.config)
  config.stages = ",".join(stages)
  for assignment in args.set:
    _apply_override(config, assignment)

  from rlhfjax.train.pipeline import train_and_evaluate
  print(f"rlhfjax demo: stages={config.stages} workdir={args.workdir} (a fresh run builds the data set "
        "and tokenizer, then trains; minutes on 2 CPU cores)", flush=True)
  t0 = time.perf_counter()
  try:
    results = train_and_evaluate(config, args.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: one line, no traceback
    print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  print(summary(results, args.workdir, time.perf_counter() - t0))
  return results


if __name__ == "__main__":
  main()
