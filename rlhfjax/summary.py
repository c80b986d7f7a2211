"""Human summaries of `train_and_evaluate` results: what each stage achieved, as `rlhfjax.main` prints it.

`SUMMARIES` maps a stage name to a function turning that stage's result dict into lines; a stage
without an entry gets one generic `key=value` line. Adding a stage's summary is one entry there.
"""

from __future__ import annotations

import os
from typing import Callable

# Stage -> printer of that stage's result dict (keys as returned by `train_and_evaluate`).
SummaryFn = Callable[[dict], list[str]]


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * float(x):5.1f}%"


def _num(x) -> str:
  return "n/a" if x is None else f"{float(x):.4f}"


def _table(rows: list[tuple[str, ...]], width: int) -> list[str]:
  """Indented rows: the first column left-aligned, the others right-aligned to ``width``."""
  w = max(len(row[0]) for row in rows)
  return [f"  {row[0]:<{w}}" + "".join(f"  {c:>{width}}" for c in row[1:]) for row in rows]


def summarize_sft(r: dict) -> list[str]:
  rows = [("", "before SFT", "after SFT"),
          ("held-out accuracy (greedy)", _pct(r.get("before_accuracy_greedy")),
           _pct(r.get("after_accuracy_greedy"))),
          ("held-out accuracy (sampled)", _pct(r.get("before_accuracy_sampled")),
           _pct(r.get("after_accuracy_sampled"))),
          ("held-out loss (nats/token)", _num(r.get("before_heldout_loss")),
           _num(r.get("after_heldout_loss")))]
  return [f"SFT ({r.get('steps', '?')} steps)"] + _table(rows, 10)


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
  lines = [f"RL ({r.get('algo', '?')}, {r.get('iterations', '?')} iterations, verifier reward)"]
  lines += _table(rows, 10)
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
  lines += _table(rows, 8)
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
  lines += _table(rows, 8)
  if r.get("gold_gain_in_sft_std") is not None:
    lines.append(f"  gold gain: {r['gold_gain_in_sft_std']:+.2f} SFT standard deviations")
  if r.get("kl_seq_mean") is not None:
    lines.append(f"  final KL(policy || SFT): {r['kl_seq_mean']:.2f} nats (target {r.get('kl_target')})")
  return lines


SUMMARIES: dict[str, SummaryFn] = {"sft": summarize_sft, "rm": summarize_rm, "rl": summarize_rl,
                                   "ppo": summarize_ppo}
STAGES = list(SUMMARIES)  # stages with their own summary, in pipeline order


def _generic(stage: str, r: dict) -> list[str]:
  return [f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in r.items())]


DEFAULT_TITLE = "rlhfjax: arithmetic (2-digit addition with a scratchpad)"


def summary(results: dict, workdir: str, wall_s: float, title: str = DEFAULT_TITLE) -> str:
  """The printed summary of a run: a header, each stage's lines in run order, wall time and where the
  run's files are."""
  lines = ["", "=" * 60, title, "=" * 60]
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
