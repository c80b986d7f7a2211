"""README's accelerator table from the JSON files `python -m rlhfjax.bench ... --json=PATH` wrote
(benchmarks/gpu/run.sh): the update's MFU against the measured matmul peak of its dtype, decode
tokens/s against the HBM roofline at the measured bandwidth. Missing files (a skipped or failed
bench) are left out.

    python benchmarks/gpu/table.py OUT/update.json OUT/decode_bf16.json OUT/decode_f32.json
"""

from __future__ import annotations

import json
import os
import sys

HEADER = ("| device | figure | config | params | tokens/s | achieved | against (measured in the same run) |\n"
          "|---|---|---|---|---|---|---|")


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def rows(run: dict) -> list[str]:
  out, dev = [], f"{run['device']} (jax {run['jax']})"
  for r in run["rows"]:
    head = f"| {dev} | {{}} | {r['config']} | {_si(r['params'], '')} | {r['tokens_per_s']:,.0f} | "
    if "roofline_tokens_per_s" in r:
      out.append(head.format("decode vs HBM roofline")
                 + f"**{100 * r['roofline_ratio']:.1f}%** of {r['roofline_tokens_per_s']:,.0f} tokens/s | "
                 f"{_si(r['hbm_bytes_per_s'], 'B/s')} (x + 1 copy), {_si(r['bytes_per_step'], 'B')} per step |")
    else:
      dt = r["dtype"] if r["dtype"] in run["peak"] else "float32"  # a CPU measures float32 only
      out.append(head.format(f"{r['bench']} update MFU")
                 + f"**{100 * r['ratio']:.1f}%** ({_si(r['flops_per_s'], 'FLOP/s')}) | "
                 f"{dt} matmul {run['peak']['n']}³ {_si(r['peak_flops_per_s'], 'FLOP/s')} |")
  return out


def main(paths: list[str]) -> str:
  lines = [HEADER]
  for p in paths:
    if os.path.exists(p):
      with open(p) as f:
        lines += rows(json.load(f))
  return "\n".join(lines)


if __name__ == "__main__":
  print(main(sys.argv[1:]))
