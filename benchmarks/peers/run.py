"""`make bench-peers`: each peer's venv, then peer and rlhfjax runs alternately, then a Markdown table.

    python benchmarks/peers/run.py                                  # 5 rounds x 5 timed iterations
    python benchmarks/peers/run.py --rounds=3 --iters=3 --peers=trl_grpo --workloads=default
    python benchmarks/peers/run.py --setup_only                     # create the venvs only

Every round runs, for each (peer, workload), the peer's script in its own venv
(benchmarks/peers/.venv-<name>, created from requirements-<name>.txt on first use) and
`python -m rlhfjax.bench rl_iteration` with the same flags, in alternating order (peer first in even
rounds), each a fresh process with its own warm-up (compile excluded on both sides). Both print
`iterations=[...]` (per-iteration seconds by phase) and end with `s_per_iter_median=<s>`. The table
pools every timed iteration of all rounds: median [min-max] seconds per iteration, ratio =
peer / rlhfjax medians, and the median seconds of each phase. Raw results go to --out (JSON).

Each side runs with the glibc setting it is faster with: the rlhfjax runs with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`--glibc_tunables`, as the Makefile sets it), each peer
with `PEER_GLIBC_TUNABLES[name]` (`--peer_glibc_tunables` sets one value for all). XLA:CPU
allocates each call's temporaries as one block (80 MiB for the short GRPO update) that glibc maps
and unmaps every call; with 4 KiB pages that costs ~20,000 page faults a call, with huge pages ~800.
Alternating runs of each peer script alone with and without it (2026-12-08 03:10 UTC): TRL GRPO
slower with it in 3 of 3 pairs (0.634-0.741 against 0.732-0.803 s), TRL PPO faster in 2 of 2
(3.47-4.06 against 3.35-3.57 s), Tunix faster in 2 of 2 (0.97-1.07 against 0.88-0.91 s).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# name -> (venv / requirements suffix, script, algorithm, label)
PEERS = {
    "trl_grpo": ("trl", "trl_grpo.py", "grpo", "TRL 1.16.0 GRPOTrainer"),
    "trl_ppo": ("trl019", "trl_ppo.py", "ppo", "TRL 0.19.1 PPOTrainer"),
    "tunix_grpo": ("tunix", "tunix_grpo.py", "grpo", "Tunix 0.1.7 GRPOLearner"),
}
WORKLOADS = {"default": [], "long": ["--long"]}
# each peer's GLIBC_TUNABLES: the setting it ran faster with (module docstring); "" = unset
PEER_GLIBC_TUNABLES = {"trl_grpo": "", "trl_ppo": "glibc.malloc.hugetlb=1",
                       "tunix_grpo": "glibc.malloc.hugetlb=1"}
PHASES = ("sample", "score", "experience", "update", "other")


def venv_python(suffix: str) -> str:
  return os.path.join(HERE, f".venv-{suffix}", "bin", "python")


def setup(suffix: str, python: str = sys.executable) -> str:
  """Create benchmarks/peers/.venv-<suffix> from requirements-<suffix>.txt (once per requirements
  content: a stamp holds its hash). torch is pinned in the requirements; a local CPU wheel
  directory (/opt/wheels) is searched first when it exists."""
  venv = os.path.join(HERE, f".venv-{suffix}")
  req = os.path.join(HERE, f"requirements-{suffix}.txt")
  digest = hashlib.sha256(open(req, "rb").read()).hexdigest()
  stamp = os.path.join(venv, ".installed")
  if os.path.exists(stamp) and open(stamp).read().strip() == digest:
    return venv_python(suffix)
  if not os.path.exists(venv_python(suffix)):
    subprocess.run(["python3", "-m", "venv", venv], check=True)
  pip = [venv_python(suffix), "-m", "pip", "install", "-q"]
  subprocess.run(pip + ["--upgrade", "pip"], check=True)
  extra = ["--find-links", "/opt/wheels"] if os.path.isdir("/opt/wheels") else []
  print(f"[bench-peers] installing {os.path.basename(req)} into {venv}", flush=True)
  subprocess.run(pip + extra + ["-r", req], check=True)
  with open(stamp, "w") as f:
    f.write(digest)
  return venv_python(suffix)


def parse(output: str) -> dict:
  """{s_per_iter_median, iterations: [{phase: s, total: s}], phases} from a run's stdout; the last
  non-empty line must be `s_per_iter_median=<s>` (ValueError otherwise)."""
  lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
  if not lines or not lines[-1].startswith("s_per_iter_median="):
    raise ValueError(f"last line is not s_per_iter_median=...: {lines[-1] if lines else '(no output)'!r}")
  out = {"s_per_iter_median": float(lines[-1].split("=", 1)[1]), "iterations": []}
  for ln in lines:
    if ln.startswith("iterations="):
      out["iterations"] = json.loads(ln.split("=", 1)[1])
    elif "of the matmul peak" in ln:  # rlhfjax's analytic FLOPs over this run's matmul peak
      out["flops_line"] = ln
  return out


def run_env(glibc_tunables: str) -> dict:
  """This process's environment with GLIBC_TUNABLES set to `glibc_tunables` (removed when empty)."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if glibc_tunables:
    env["GLIBC_TUNABLES"] = glibc_tunables
  return env


def run_one(cmd: list[str], timeout: float, env=None) -> dict:
  t = time.perf_counter()
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
  wall = time.perf_counter() - t
  if p.returncode:
    tail = (p.stdout + p.stderr).strip().splitlines()[-5:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail), "wall_s": wall}
  try:
    r = parse(p.stdout)
  except ValueError as e:
    return {"error": str(e), "wall_s": wall}
  r["wall_s"] = wall
  return r


def summarize(runs: list[dict]) -> dict | None:
  """Pool the timed iterations of all successful runs: median / min / max seconds per iteration,
  per-phase medians, and each run's own median."""
  its = [it for r in runs if "error" not in r for it in r["iterations"]]
  if not its:
    return None
  totals = [it["total"] for it in its]
  phases = {k: statistics.median(it.get(k, 0.0) for it in its) for k in PHASES
            if any(k in it for it in its)}
  return {"median": statistics.median(totals), "min": min(totals), "max": max(totals),
          "n": len(totals), "phases": phases,
          "run_medians": [r["s_per_iter_median"] for r in runs if "error" not in r]}


def _cell(s: dict | None) -> str:
  return "failed" if s is None else f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def _phases(s: dict | None) -> str:
  if s is None:
    return ""
  return " / ".join(f"{k} {v:.3f}" for k, v in s["phases"].items())


def build_table(rows: list[dict]) -> str:
  """Markdown table of rows {workload, peer, peer_runs, rlhfjax_runs} (run dicts as `run_one`)."""
  head = ("| workload | peer | peer s/iter median [min–max] | rlhfjax s/iter median [min–max] | "
          "ratio peer / rlhfjax | peer phases (s) | rlhfjax phases (s) | iterations (peer, rlhfjax) |\n"
          "|---|---|---|---|---|---|---|---|")
  out = [head]
  for row in rows:
    ps, rs = summarize(row["peer_runs"]), summarize(row["rlhfjax_runs"])
    ratio = f"**{ps['median'] / rs['median']:.2f}×**" if ps and rs else "n/a"
    errors = [r["error"] for r in row["peer_runs"] + row["rlhfjax_runs"] if "error" in r]
    peer = row["peer"] + (f" ({errors[0][:120]})" if errors and ps is None else "")
    out.append(f"| {row['workload']} | {peer} | {_cell(ps)} | {_cell(rs)} | {ratio} | {_phases(ps)} | "
               f"{_phases(rs)} | {ps['n'] if ps else 0}, {rs['n'] if rs else 0} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {list(PEERS)}")
  p.add_argument("--workloads", default="default,long", help="default,long")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--iters", type=int, default=5, help="timed iterations per run")
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations per run")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
  p.add_argument("--setup_only", action="store_true")
  p.add_argument("--no_setup", action="store_true", help="use the venvs as they are")
  p.add_argument("--out", default=os.path.join(HERE, "results.json"))
  p.add_argument("--glibc_tunables", default="glibc.malloc.hugetlb=1",
                 help="GLIBC_TUNABLES of the rlhfjax runs ('' for glibc's defaults)")
  p.add_argument("--peer_glibc_tunables", default=None,
                 help="GLIBC_TUNABLES of every peer's runs ('' for glibc's defaults; default: "
                      "PEER_GLIBC_TUNABLES, per peer)")
  args = p.parse_args(argv)
  peers = [x for x in args.peers.split(",") if x]
  workloads = [x for x in args.workloads.split(",") if x]
  pythons = {}
  for name in peers:
    suffix = PEERS[name][0]
    try:
      pythons[name] = venv_python(suffix) if args.no_setup else setup(suffix)
    except subprocess.CalledProcessError as e:
      print(f"[bench-peers] {name}: venv setup failed ({e}); its rows will say so", flush=True)
  if args.setup_only:
    return
  rows = {(w, n): {"workload": w, "peer": PEERS[n][3], "name": n, "peer_runs": [], "rlhfjax_runs": []}
          for w in workloads for n in peers}
  flags = [f"--steps={args.iters}", f"--warmup={args.warmup}"]
  tunables = {n: PEER_GLIBC_TUNABLES[n] if args.peer_glibc_tunables is None else args.peer_glibc_tunables
              for n in peers}
  tunables["rlhfjax"] = args.glibc_tunables
  started = datetime.datetime.now(datetime.timezone.utc)
  for rnd in range(args.rounds):
    for (w, n), row in rows.items():
      _, script, algo, _ = PEERS[n]
      peer_cmd = [pythons.get(n, "false"), os.path.join(HERE, script), *WORKLOADS[w], *flags]
      ours_cmd = [sys.executable, "-m", "rlhfjax.bench", "rl_iteration", f"--algo={algo}",
                  *WORKLOADS[w], *flags]
      order = [("peer_runs", peer_cmd), ("rlhfjax_runs", ours_cmd)]
      for key, cmd in (order if rnd % 2 == 0 else order[::-1]):
        env = run_env(tunables[n if key == "peer_runs" else "rlhfjax"])
        r = run_one(cmd, args.timeout, env) if n in pythons or key == "rlhfjax_runs" else {"error": "no venv"}
        r["round"], r["load_avg"] = rnd, os.getloadavg()[0]
        row[key].append(r)
        got = r.get("error") or f"{r['s_per_iter_median']:.3f} s/iter"
        print(f"[bench-peers] round {rnd + 1}/{args.rounds} {w} {n} {key.split('_')[0]}: {got} "
              f"({r['wall_s']:.0f} s wall, load {r['load_avg']:.1f})", flush=True)
      with open(args.out, "w") as f:
        json.dump({"started": started.isoformat(), "argv": sys.argv[1:],
                   "glibc_tunables": tunables, "rows": list(rows.values())},
                  f, indent=1)
  print()
  glibc = ", ".join(f"{k} {v or 'unset'}" for k, v in tunables.items())
  print(f"<!-- {started:%Y-%m-%d %H:%M} UTC, {args.rounds} rounds x {args.iters} timed iterations "
        f"(+{args.warmup} warm-up) per side, alternating; GLIBC_TUNABLES "
        f"{glibc}; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores -->")
  print(build_table(list(rows.values())))


if __name__ == "__main__":
  main()
