"""Reward hacking: PPO without a KL penalty against a reward model from 300 simulated comparisons.

    python experiments/hacking.py --workdir=/tmp/hack            # the whole study from scratch (table + plot)
    python -m rlhfjax.main --config=experiments/hacking.py --workdir=/tmp/hack1             # one run: no KL
    python -m rlhfjax.main --config=experiments/hacking.py:early_stop --workdir=/tmp/hack2  # one mitigation

The setting of experiments/ppo_preference.py (chatty teacher, simulated human with a hidden gold
preference), with a small label budget: the reward model is a 4-member bootstrap ensemble trained on
300 comparisons, and PPO maximizes its mean (`rm.uncertainty_coef = 0`) with no KL penalty
(`rl.kl_coef = 0`). Gold (the simulated human's hidden utility), proxy (the RM) and KL(policy ||
SFT) are measured on 128 held-out prompts every 3 iterations (`ppo.eval_kl`), for the Gao et al.
(2022) picture: gold and proxy against sqrt(KL).

Variants (`get_config(variant)`; each changes one thing of the no-KL run):
  no_kl       the baseline above
  kl_fixed    rl.kl_coef = 0.1 (per-token KL penalty in the reward)
  adaptive_kl rl.adaptive_kl = True (Ziegler et al. controller: target 2 nats, beta0 0.1)
  ensemble    rm.uncertainty_coef = 1.0 (PPO maximizes mean - 1.0 * std of the 4 members)
  early_stop  ppo.early_stop = "label_agreement": every 3 iterations 32 fresh comparisons from the
              labeler (rollout sample vs the policy of the previous reading); stop once the RM's
              agreement with them falls below 0.75 x its first two readings, twice in a row
  more_labels labeler.label_budget = 1500 (5x the comparisons, its own reward model)

The driver (`python experiments/hacking.py`) trains SFT once, one reward model per label budget,
then every variant's PPO on copies of those workdirs (`ppo.rl_seed` = 0, 1, 2 for the headline runs
no_kl and adaptive_kl: the RL loop alone is re-seeded, the SFT/RM and the held-out prompts stay), and writes
`<workdir>/hacking.md` (the table, also printed), `<workdir>/hacking.json` and the figure
(`docs/figures/hacking.png` by default). A finished run is skipped when the command is re-run.
"""

from __future__ import annotations

import ml_collections

try:
  from . import ppo_preference
except ImportError:  # loaded by path (config_flags / as a script): no package to be relative to
  import os as _os
  import sys as _sys
  _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
  if _root not in _sys.path:
    _sys.path.insert(0, _root)
  from rlhfjax.config import import_sibling
  ppo_preference = import_sibling(__file__, "ppo_preference")

SMALL_BUDGET, LARGE_BUDGET = 300, 1500

# variant -> (overrides of the no-KL run, what it is)
VARIANTS = {
    "no_kl": ({}, "no KL penalty (baseline)"),
    "kl_fixed": ({"rl.kl_coef": 0.1}, "fixed KL penalty, beta 0.1"),
    "adaptive_kl": ({"rl.adaptive_kl": True}, "adaptive KL controller, target 2 nats"),
    "ensemble": ({"rm.uncertainty_coef": 1.0}, "RM ensemble, mean - 1.0 std"),
    "early_stop": ({"ppo.early_stop": "label_agreement"}, "early stop: RM vs fresh labels"),
    "more_labels": ({"labeler.label_budget": LARGE_BUDGET}, f"{LARGE_BUDGET} labels instead of {SMALL_BUDGET}"),
}
HEADLINE = ("no_kl", "adaptive_kl")  # run with --seeds PPO seeds (the baseline and the best mitigation)


def get_config(variant: str = "no_kl"):
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  c = ppo_preference.get_config()
  c.unlock()
  c.stages = "sft,rm,ppo"
  # the reward model: a small label budget, a 4-member bootstrap ensemble whose mean is the proxy
  c.labeler.label_budget = SMALL_BUDGET  # comparisons from the simulated human
  c.labeler.test_comparisons = 300  # held-out pairs for the RM's agreement
  c.rm.ensemble_size = 4  # members trained together (vmap); their std is the disagreement
  c.rm.bootstrap = True  # each member sees a Poisson(1)-reweighted sample of the comparisons
  c.rm.uncertainty_coef = 0.0  # PPO maximizes the members' mean (the `ensemble` variant: 1.0)
  # PPO without a KL penalty: nothing holds the policy near SFT
  r = c.rl
  r.kl_coef = 0.0  # no KL term in the reward (kl_fixed: 0.1; adaptive_kl: beta0 0.1)
  r.adaptive_kl = False
  r.kl_target = 2.0  # the adaptive_kl variant's target (ppo_preference.py's budget)
  r.epochs = 2  # PPO epochs per batch
  r.minibatch_size = 32  # 2 minibatches of 32 per epoch
  c.rl_optim.learning_rate = 1.5e-4  # policy lr
  c.rl_loop.iterations = 30
  c.rl_loop.prompts_per_iter = 64
  c.rl_loop.eval_every = 3  # held-out gold / proxy / KL every 3 iterations
  c.rl_loop.eval_examples = 0  # no accuracy eval (the gold eval has the correctness term)
  c.rl_loop.checkpoint_every = 30
  c.ppo.gold_eval_prompts = 128  # held-out prompts of the gold / proxy / KL eval
  c.ppo.eval_kl = True  # KL(policy || SFT) of the held-out samples (the training KL is 0 without a penalty)
  # the early_stop variant's rule (only `ppo.early_stop` is switched on there)
  c.ppo.early_stop_every = 3
  c.ppo.early_stop_labels = 32
  c.ppo.early_stop_baseline = 2
  c.ppo.early_stop_factor = 0.75
  c.ppo.early_stop_patience = 2
  if variant == "adaptive_kl":
    r.kl_coef = 0.1  # the controller's initial beta (it scales beta, so it cannot start at 0)
    r.kl_horizon = 640.0
  for key, value in VARIANTS[variant][0].items():
    section, name = key.split(".")
    c[section][name] = value
  c.lock()
  return c


# -- the study ------------------------------------------------------------------------------------


def summarize(evals: list[dict], stopped_at: int | None = None) -> dict:
  """Peak and final of one run from its held-out eval rows (`step`, `gold_mean`, `proxy_mean`,
  `kl_seq_mean`). With `stopped_at`, rows after the stop (the frozen policy) count only as the final
  one. Returns peak_gold / peak_step / peak_kl, final_gold / final_proxy / final_kl / final_step."""
  rows = sorted(evals, key=lambda r: r["step"])
  if not rows:
    raise ValueError("no eval rows")
  curve = [r for r in rows if stopped_at is None or r["step"] <= stopped_at]
  final = rows[-1]
  if stopped_at is not None and curve[-1]["step"] != stopped_at:
    curve = curve + [{**final, "step": stopped_at}]
  peak = max(curve, key=lambda r: r["gold_mean"])
  return {"start_gold": rows[0]["gold_mean"], "peak_gold": peak["gold_mean"], "peak_step": peak["step"],
          "peak_kl": peak.get("kl_seq_mean"), "final_gold": final["gold_mean"],
          "final_proxy": final.get("proxy_mean"), "final_kl": final.get("kl_seq_mean"),
          "final_step": stopped_at if stopped_at is not None else final["step"]}


def _fmt(values, digits=2):
  import numpy as np
  v = [x for x in values if x is not None]
  if not v:
    return "–"
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


def build_table(runs: list[dict]) -> tuple[str, dict]:
  """Markdown table over `runs` (dicts: variant, seed, summary, wall_s, labels_used, stopped_at),
  grouped by variant (mean ± std over seeds), and the best gold any run reached."""
  import numpy as np
  best = max(r["summary"]["peak_gold"] for r in runs)
  order = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
  lines = ["| run | seeds | peak gold (iteration) | final gold | final / best gold of any run | "
           "final proxy | KL at end / stop (nats) | stopped at | fresh labels | wall time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  groups = {}
  for v in order:
    rs = [r for r in runs if r["variant"] == v]
    s = [r["summary"] for r in rs]
    ratio = [x["final_gold"] / best for x in s]
    groups[v] = {"seeds": [r["seed"] for r in rs], "final_gold_mean": float(np.mean([x["final_gold"] for x in s])),
                 "final_over_best": float(np.mean(ratio))}
    stops = [r["stopped_at"] for r in rs]
    labels = [r.get("labels_used") for r in rs]
    lines.append(
        f"| {VARIANTS[v][1]} (`{v}`) | {len(rs)} | {_fmt([x['peak_gold'] for x in s])} "
        f"({', '.join(str(x['peak_step']) for x in s)}) | {_fmt([x['final_gold'] for x in s])} | "
        f"{100 * np.mean(ratio):.0f}% | {_fmt([x['final_proxy'] for x in s])} | "
        f"{_fmt([x['final_kl'] for x in s], 1)} | "
        f"{', '.join('–' if t is None else str(t) for t in stops)} | "
        f"{'–' if all(x is None for x in labels) else ', '.join(str(x) for x in labels)} | "
        f"{_fmt([r['wall_s'] for r in rs], 0)} |")
  return "\n".join(lines), {"best_gold_any_run": best, "groups": groups}


def _read_run(workdir: str) -> dict:
  import json
  import os

  from rlhfjax.metrics import read_metrics
  rows = read_metrics(workdir)
  evals = [r for r in rows if r.get("stage") == "ppo_eval" and "gold_mean" in r]
  train = [r for r in rows if r.get("stage") == "ppo" and "reward_mean" in r]
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)["ppo"]
  return {"evals": evals, "train": train, "stopped_at": res.get("early_stopped_at"),
          "labels_used": res.get("early_stop_labels_used")}


def plot(runs: list[dict], path: str, best: float) -> None:
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  ax = axes[0]
  for r in runs:
    if r["variant"] != "no_kl":
      continue
    e = sorted(r["evals"], key=lambda x: x["step"])
    x = np.sqrt(np.maximum([v["kl_seq_mean"] for v in e], 0))
    lab = r["seed"] == 0
    ax.plot(x, [v["proxy_mean"] for v in e], "o-", color="tab:orange", alpha=0.8, ms=3,
            label="proxy (RM ensemble mean)" if lab else None)
    ax.plot(x, [v["gold_mean"] for v in e], "o-", color="tab:blue", alpha=0.8, ms=3,
            label="gold (simulated human)" if lab else None)
    i = int(np.argmax([v["gold_mean"] for v in e]))
    ax.plot(x[i], e[i]["gold_mean"], "*", color="crimson", ms=14, label="gold peak" if lab else None)
  n = sum(r["variant"] == "no_kl" for r in runs)
  ax.set(xlabel="sqrt(KL(policy || SFT)), held-out samples", ylabel="score (held-out mean)",
         title=f"no KL penalty, {SMALL_BUDGET} labels ({n} PPO seed{'s' if n > 1 else ''})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax = axes[1]
  colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for r in runs:
    if r["seed"] != 0:
      continue
    e = sorted(r["evals"], key=lambda x: x["step"])
    if r["stopped_at"] is not None:
      e = [v for v in e if v["step"] <= r["stopped_at"]] or e[:1]
    x = np.sqrt(np.maximum([v["kl_seq_mean"] for v in e], 0))
    ax.plot(x, [v["gold_mean"] for v in e], "o-", ms=3, color=colors[r["variant"]],
            label=VARIANTS[r["variant"]][1])
    ax.plot(x[-1], e[-1]["gold_mean"], "s", ms=8, color=colors[r["variant"]])
  ax.axhline(0.9 * best, color="gray", ls=":", label="90% of the best gold of any run")
  ax.set(xlabel="sqrt(KL(policy || SFT))", ylabel="gold (held-out mean)",
         title="gold vs sqrt(KL), seed 0 (square: end / stop)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax = axes[2]
  for r in runs:
    if r["variant"] != "early_stop":
      continue
    t = [v for v in r["train"] if np.isfinite(v.get("label_agreement", np.nan))]
    ax.plot([v["step"] for v in t], [v["label_agreement"] for v in t], "o-", ms=3, color="tab:green",
            alpha=0.8, label="RM agreement with fresh labels" if r["seed"] == 0 else None)
    if r["stopped_at"] is not None:
      ax.axvline(r["stopped_at"], color="tab:green", ls=":", alpha=0.7)
  for r in runs:
    if r["variant"] == "no_kl":
      e = sorted(r["evals"], key=lambda x: x["step"])
      ax.plot([v["step"] for v in e], [v["gold_mean"] / best for v in e], "-", color="tab:blue",
              alpha=0.5, label="no-KL gold / best gold" if r["seed"] == 0 else None)
      t = r["train"]
      ax.plot([v["step"] for v in t], [v["rm_std"] for v in t], "-", color="tab:purple", alpha=0.5,
              label="no-KL RM ensemble std (disagreement)" if r["seed"] == 0 else None)
  ax.set(xlabel="PPO iteration", title="gold-free signals (dotted: early stops)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  import os
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _copy_base(src: str, dst: str, stages: tuple[str, ...]) -> None:
  import os
  import shutil
  os.makedirs(os.path.join(dst, "checkpoints"), exist_ok=True)
  for name in ("tokenizer.model", "tfds"):
    s, d = os.path.join(src, name), os.path.join(dst, name)
    if os.path.exists(s) and not os.path.exists(d):
      (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, d)
  for stage in stages:
    d = os.path.join(dst, "checkpoints", stage)
    if not os.path.exists(d):
      shutil.copytree(os.path.join(src, "checkpoints", stage), d)


def main(argv=None) -> int:
  import argparse
  import json
  import os
  import shutil
  import time

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, default=3, help="PPO seeds of the headline runs")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
  parser.add_argument("--figure", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "docs", "figures", "hacking.png"))
  args = parser.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  t_start = time.perf_counter()

  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the runs share programs
  from rlhfjax.main import _quiet
  _quiet()
  from rlhfjax.config import parse_config
  from rlhfjax.train.pipeline import train_and_evaluate
  here = os.path.abspath(__file__)

  def config(variant, *flags):
    return parse_config([f"--config={here}:{variant}", *flags])

  def stage(workdir, cfg):  # wall seconds of the stage (read back when an earlier command ran it)
    timing = os.path.join(workdir, "wall_s.json")
    if not os.path.exists(os.path.join(workdir, "results.json")):
      t = time.perf_counter()
      train_and_evaluate(cfg, workdir)
      with open(timing, "w") as f:
        json.dump({"wall_s": time.perf_counter() - t}, f)
    with open(timing) as f:
      return json.load(f)["wall_s"]

  w = args.workdir
  times = {"sft": stage(os.path.join(w, "sft"), config("no_kl", "--config.stages=sft"))}
  rm_dirs = {}
  for budget, variant in ((SMALL_BUDGET, "no_kl"), (LARGE_BUDGET, "more_labels")):
    if budget == LARGE_BUDGET and "more_labels" not in variants:
      continue
    d = rm_dirs[budget] = os.path.join(w, f"rm_{budget}")
    _copy_base(os.path.join(w, "sft"), d, ("sft",))
    times[f"rm_{budget}"] = stage(d, config(variant, "--config.stages=rm"))
  runs = []
  for variant in variants:
    budget = LARGE_BUDGET if variant == "more_labels" else SMALL_BUDGET
    for seed in range(args.seeds if variant in HEADLINE else 1):
      d = os.path.join(w, "runs", f"{variant}_s{seed}")
      _copy_base(rm_dirs[budget], d, ("sft", "rm"))
      wall = stage(d, config(variant, "--config.stages=ppo", f"--config.ppo.rl_seed={seed}"))
      run = {"variant": variant, "seed": seed, "wall_s": wall, **_read_run(d)}
      run["summary"] = summarize(run["evals"], run["stopped_at"])
      runs.append(run)
      s = run["summary"]
      print(f"hacking: {variant} seed {seed}: peak gold {s['peak_gold']:.2f} at {s['peak_step']}, "
            f"final {s['final_gold']:.2f} (KL {s['final_kl']:.1f}), {wall:.0f} s", flush=True)
  table, extra = build_table(runs)
  total = time.perf_counter() - t_start
  text = (f"# Reward hacking (experiments/hacking.py)\n\n{table}\n\n"
          f"Best gold of any run (held-out peak): {extra['best_gold_any_run']:.2f}. "
          f"SFT {times['sft']:.0f} s, reward models "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in times.items() if k != 'sft')}; "
          f"stages together {(sum(times.values()) + sum(r['wall_s'] for r in runs)) / 60:.1f} min; "
          f"this command {total / 60:.1f} min.\n")
  with open(os.path.join(w, "hacking.md"), "w") as f:
    f.write(text)
  with open(os.path.join(w, "hacking.json"), "w") as f:
    json.dump({"runs": [{k: v for k, v in r.items() if k not in ("train",)} for r in runs],
               "times": times, "total_s": total, **extra}, f, indent=1, default=float)
  plot(runs, os.path.join(w, "hacking.png"), extra["best_gold_any_run"])
  figure = os.path.join(w, "hacking.png")
  if args.figure and os.path.abspath(args.figure) != os.path.abspath(figure):
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    shutil.copy2(figure, args.figure)
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
