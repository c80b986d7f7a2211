"""Reward and held-out accuracy curves of the exceed-the-teacher runs, one line per algorithm.

    python docs/plot_exceed_teacher.py grpo=/tmp/grpo_arith rloo=/tmp/rloo_arith \
        reinforce_pp=/tmp/rpp_arith best_of_n=/tmp/bon_arith --out=docs/exceed_teacher.png

Also writes each workdir's own per-metric plots with `rlhfjax.metrics.plot_curves`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  from rlhfjax.metrics import plot_curves, read_metrics

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", metavar="NAME=WORKDIR")
  p.add_argument("--out", default="docs/exceed_teacher.png")
  args = p.parse_args(argv)
  fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
  teacher = None
  for spec in args.runs:
    name, _, workdir = spec.partition("=")
    plot_curves(workdir, stages=["rl", "rl_eval"])
    train = read_metrics(workdir, "rl")
    evals = read_metrics(workdir, "rl_eval")
    pts = sorted({r["step"]: r["reward_mean"] for r in train}.items())
    ax_r.plot([s for s, _ in pts], [v for _, v in pts], label=name)
    pts = sorted({r["step"]: r["accuracy_greedy"] for r in evals}.items())
    ax_a.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
    teacher = next((r["teacher_accuracy"] for r in evals if "teacher_accuracy" in r), teacher)
  if teacher is not None:
    for ax, scale in ((ax_r, 1), (ax_a, 100)):
      ax.axhline(scale * teacher, color="gray", ls="--", label="teacher")
  ax_r.set(title="mean verifier reward of RL samples (T=1)", xlabel="RL iteration", ylabel="reward")
  ax_a.set(title="held-out accuracy, greedy", xlabel="RL iteration (0 = after SFT)", ylabel="%")
  for ax in (ax_r, ax_a):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=100)
  print(args.out)


if __name__ == "__main__":
  main()
