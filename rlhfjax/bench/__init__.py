"""Throughput and MFU of the performance-critical paths, as Markdown table rows.

    python -m rlhfjax.bench all                          # matmul peak, then every bench in BENCHES
    python -m rlhfjax.bench sft --d_model=1024 --n_layers=16 --seq=1024 --batch=16 --dtype=bfloat16
    python -m rlhfjax.bench sample --batch=64 --new_tokens=256 --devices=all
    python -m rlhfjax.bench rl_step --algo grpo          # seconds per RL iteration split by phase
    python -m rlhfjax.bench ppo_update --epochs=4 --minibatch=4 --variant=shard_map
    python -m rlhfjax.bench rm_score --ensemble=4
    python -m rlhfjax.bench rl_iteration --algo=ppo     # the peer work (benchmarks/peers/); --long
    python -m rlhfjax.bench sft --size=1b --dtype=bfloat16 --batch=8 --seq=1024   # benchmarks/gpu/

Every run first measures the matmul peak in the same process and reports achieved FLOP/s as a
ratio of it (on a shared CPU absolute numbers move with the load, the ratio much less).

`BENCHES` registers every bench (`all` runs them in order): `bench_x(*, peak, **flags) -> row dict`
(`common.result`), ignoring flags it does not take. They live in lm.py (sample, sft), rl.py
(rl_step, ppo_update, rl_iteration) and rm.py (rm_score), which import only `common.py`; each module's docstring
says how its FLOPs are counted. Defaults suit a 2-core CPU; heavy imports happen inside functions.
`--size` (`common.SIZES`: tiny, 1b) fills the model-shape flags of the benches that take them all
(sample, sft, ppo_update, rm_score; explicit flags win); `sample` also reports decode tokens/s
against the HBM roofline at the memory bandwidth it measures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from typing import Callable

from rlhfjax.bench.common import SIZES, matmul_peak
from rlhfjax.bench.lm import bench_sample, bench_sft
from rlhfjax.bench.rl import bench_ppo_update, bench_rl_iteration, bench_rl_step
from rlhfjax.bench.rm import bench_rm_score

__all__ = ["BENCHES", "HEADER", "SIZED", "SIZES", "main", "matmul_peak", "memory_line", "peak_rows",
           "row"]

BENCHES: dict[str, Callable[..., dict]] = {
    "sample": bench_sample,
    "sft": bench_sft,
    "rl_step": bench_rl_step,
    "ppo_update": bench_ppo_update,
    "rm_score": bench_rm_score,
    "rl_iteration": bench_rl_iteration,  # last: its final line is s_per_iter_median=<seconds>
}
# The benches `--size` applies to: those taking every model-shape flag of a preset.
SIZED = tuple(n for n, f in BENCHES.items()
              if set(SIZES["1b"]) <= set(inspect.signature(f).parameters))


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


HEADER = ("| bench | config | params | tokens/s | achieved FLOP/s | matmul peak FLOP/s | "
          "MFU vs measured peak | step | compile |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
  return (f"| {r['bench']} | {r['config']} | {_si(r['params'])} | {r['tokens_per_s']:,.0f} | "
          f"{_si(r['flops_per_s'], 'FLOP/s')} | {_si(r['peak_flops_per_s'], 'FLOP/s')} | "
          f"{100 * r['ratio']:.1f}% | {1e3 * r['step_s']:.0f} ms | {r['compile_s']:.1f} s |")


def peak_rows(peak: dict) -> list[str]:
  return [f"| matmul | {peak['n']}x{peak['n']} {dt} ({peak['platform']}) | | | {_si(v, 'FLOP/s')} | "
          f"{_si(v, 'FLOP/s')} | 100% | {1e3 * 2 * peak['n'] ** 3 / v:.1f} ms | |"
          for dt, v in peak.items() if dt not in ("n", "platform")]


def memory_line(r: dict) -> str | None:
  if not r["memory"]:
    return None
  return f"{r['bench']} compiled memory: " + ", ".join(
      f"{k.replace('_size_in_bytes', '')}={v / 2**20:.1f} MiB" for k, v in r["memory"].items())


def _vocab(s: str):
  return int(s) if s.isdigit() else s


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the usage block first
    self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _size(s: str) -> str:
  if s not in SIZES:
    raise argparse.ArgumentTypeError(f"unknown size {s!r}, choose from {', '.join(SIZES)}")
  return s


def _positive(s: str) -> int:
  if not s.isdigit() or int(s) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
  return int(s)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m rlhfjax.bench",
              description="rlhfjax throughput / MFU benchmarks (Markdown rows).")
  p.add_argument("which", choices=[*BENCHES, "all"], help="one bench, or all of them in order")
  presets = "; ".join(f"{k}: " + " ".join(f"{f}={v}" for f, v in d.items()) for k, d in SIZES.items())
  p.add_argument("--size", type=_size, metavar="{" + ",".join(SIZES) + "}",
                 help=f"model-shape preset of {', '.join(SIZED)} (explicit flags win): {presets}")
  p.add_argument("--d_model", type=int)
  p.add_argument("--n_layers", type=int)
  p.add_argument("--head_dim", type=_positive, help="attention head width (heads = d_model / head_dim; "
                                                    f"{', '.join(SIZED)}; default 64)")
  p.add_argument("--d_ff", type=_positive, help=f"SwiGLU width ({', '.join(SIZED)}; default 3 x d_model)")
  p.add_argument("--vocab", type=_vocab, help="vocabulary (rl_step: its own tokenizer's; "
                                              "rl_iteration: arith16, the peer work's 16 tokens)")
  p.add_argument("--batch", type=int, help="sequences (rl_step: prompts)")
  p.add_argument("--n_heads", type=int, help="rl_iteration: attention heads (no GQA)")
  p.add_argument("--prompts", type=int, help="rl_iteration: prompts per iteration")
  p.add_argument("--max_new", type=int, help="rl_iteration: response budget (new tokens)")
  p.add_argument("--long", action="store_true", default=None,
                 help="rl_iteration: the long workload, 256 new tokens with EOS on")
  p.add_argument("--warmup", type=int, help="rl_iteration: untimed warm-up iterations (default 1)")
  p.add_argument("--recompute_logprobs", action="store_true", default=None,
                 help="rl_iteration: recompute the old log-probs even on-policy (rl.reuse_logprobs=False)")
  p.add_argument("--pack", type=lambda v: {"true": True, "false": False}[v.lower()], metavar="{true,false}",
                 help="rl_iteration: pack the rollout's sequences (rl.pack; default: true for long GRPO)")
  p.add_argument("--sampler_logprobs", type=lambda v: {"true": True, "false": False}[v.lower()],
                 metavar="{true,false}", help="rl_iteration: the old log-probs from the sampler, no policy "
                 "forward before the update (rl.sampler_logprobs; default: true for PPO, as TRL's PPOTrainer; "
                 "GRPO is on-policy unless --recompute_logprobs)")
  p.add_argument("--per_layer_update", type=lambda v: {"true": True, "false": False}[v.lower()],
                 metavar="{true,false}", help="rl_iteration: the update per layer, its last layer on the "
                 "predicting columns only (rl.per_layer_update; default: true)")
  p.add_argument("--share_prompt", type=lambda v: {"true": True, "false": False}[v.lower()],
                 metavar="{true,false}", help="rl_iteration (GRPO): each group's prompt once per forward "
                 "(rl.share_prompt; default: true for short GRPO)")
  p.add_argument("--seq", type=int, help="sft, ppo_update, rm_score: sequence length")
  p.add_argument("--prompt", type=int, help="sample, ppo_update: prompt length")
  p.add_argument("--new_tokens", type=int, help="sample, rl_step: tokens generated per row")
  p.add_argument("--steps", type=int, help="timed calls after one warm-up call (median reported)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="model compute dtype")
  p.add_argument("--param_dtype", choices=["float32", "bfloat16"],
                 help="sample: the weights' storage dtype (default float32, the RL loop's)")
  p.add_argument("--bandwidth_mib", type=_positive,
                 help="sample: memory-bandwidth copy size in MiB (default 256 CPU / 2048 accelerators)")
  p.add_argument("--devices", choices=["one", "all"], help="one-device mesh (default) or all devices")
  p.add_argument("--remat", nargs="?", const="full", choices=["none", "full", "dots"], default=None,
                 help="sft, ppo_update, rl_iteration: rematerialize layers; the value is what a "
                      "layer keeps (model.remat_policy; bare --remat = full; rl_iteration's "
                      "default: dots for GRPO, none for PPO)")
  p.add_argument("--attention", choices=["einsum", "dot_product"],
                 help="sft: the no-cache attention (model.attention; default einsum)")
  p.add_argument("--matmul_n", type=int, help="matmul peak size (default 1024 CPU / 8192 accelerators)")
  p.add_argument("--algo", choices=["ppo", "grpo", "rloo", "reinforce_pp", "best_of_n"],
                 help="rl_step: the RL algorithm (rl_iteration: grpo or ppo)")
  p.add_argument("--group", type=int, help="rl_step, rl_iteration: samples per prompt "
                                           "(rl_step: --batch = prompts)")
  p.add_argument("--epochs", type=int, help="rl_step, ppo_update: passes over the batch")
  p.add_argument("--minibatch", type=int, help="rl_step, ppo_update: rows per optimizer step "
                                               "(default: the whole batch)")
  p.add_argument("--microbatch", type=int, help="rl_step, ppo_update: gradient-accumulation chunk")
  p.add_argument("--variant", choices=["jit", "shard_map"],
                 help="rl_step, ppo_update: the jitted update or its shard_map variant")
  p.add_argument("--ensemble", type=int, help="rm_score: reward-model ensemble members")
  p.add_argument("--profile", metavar="DIR",
                 help="rl_iteration: trace one more iteration (after the timed ones, not counted) "
                      "into DIR with jax.profiler, for xprof / TensorBoard's profile plugin")
  p.add_argument("--json", metavar="PATH", help="also write the device, the peak and the row dicts to PATH")
  return p


def main(argv=None) -> list[dict]:
  """Parse `argv` (default: sys.argv), print the Markdown rows, return the row dicts."""
  p = parser()
  args = p.parse_args(argv)
  if args.size and args.which not in (*SIZED, "all"):
    p.error(f"--size applies to {', '.join(SIZED)}, not {args.which}")
  overrides = {k: v for k, v in vars(args).items()
               if v is not None and k not in ("which", "matmul_n", "size", "json")}

  import jax
  peak = matmul_peak(args.matmul_n)
  tunables = os.environ.get("GLIBC_TUNABLES")  # glibc.malloc.hugetlb=1 changes CPU timings (README)
  print(f"<!-- {jax.devices()[0].device_kind}, {jax.device_count()} device(s), jax {jax.__version__}"
        f"{f', GLIBC_TUNABLES={tunables}' if tunables else ''} -->")
  print(HEADER)
  for line in peak_rows(peak):
    print(line, flush=True)
  results = []
  for name in (list(BENCHES) if args.which == "all" else [args.which]):
    preset = SIZES[args.size] if args.size and name in SIZED else {}
    r = BENCHES[name](peak=peak, **{**preset, **overrides})
    results.append(r)
    print(row(r), flush=True)
  for r in results:
    if line := memory_line(r):
      print(line)
    for line in r.get("lines", ()):
      print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                 "device_count": jax.device_count(), "jax": jax.__version__, "peak": peak,
                 "rows": results}, f, indent=1)
  return results
