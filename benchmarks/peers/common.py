"""What the peer scripts share: the work (rlhfjax/bench/peer_work.py, loaded by path: the peers' venvs
do not have rlhfjax), their flags (the same as `python -m rlhfjax.bench rl_iteration`'s), the random
Llama models and tokenizer, and the summary every script prints last:

    phases={...}             median seconds per phase
    iterations=[{...}, ...]  every timed iteration (`total` and the phases it could split)
    s_per_iter_median=<s>    the last line
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK_FILE = os.path.join(ROOT, "rlhfjax", "bench", "peer_work.py")


def load_work():
  spec = importlib.util.spec_from_file_location("peer_work", WORK_FILE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


work = load_work()


def parser(algo: str, description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--d_model", type=int)
  p.add_argument("--n_layers", type=int)
  p.add_argument("--n_heads", type=int)
  p.add_argument("--vocab", default="arith16", choices=["arith16"])
  p.add_argument("--prompts", type=int)
  p.add_argument("--group", type=int)
  p.add_argument("--max_new", type=int)
  p.add_argument("--steps", type=int, default=5, help="timed iterations")
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
  p.add_argument("--long", action="store_true", help="256 new tokens with EOS on")
  p.set_defaults(algo=algo)
  return p


def resolve(args) -> dict:
  """The workload (`peer_work.workload`) with the flags that were given."""
  w = work.workload(args.algo, args.long)
  for k in ("d_model", "n_layers", "n_heads", "prompts", "group", "max_new"):
    if getattr(args, k, None):
      w[k] = getattr(args, k)
  w["d_ff"] = work.MODEL["d_ff"] * w["d_model"] // work.MODEL["d_model"]
  w["head_dim"] = w["d_model"] // w["n_heads"]
  w["steps"], w["warmup"] = args.steps, args.warmup
  return w


def llama_config(w: dict, **extra):
  """A random-init Llama config of the work's shape (transformers)."""
  from transformers import LlamaConfig
  return LlamaConfig(vocab_size=len(work.VOCAB), hidden_size=w["d_model"],
                     intermediate_size=w["d_ff"], num_hidden_layers=w["n_layers"],
                     num_attention_heads=w["n_heads"], num_key_value_heads=w["n_heads"],
                     head_dim=w["head_dim"], max_position_embeddings=work.PROMPT_LEN + w["max_new"],
                     rms_norm_eps=w["rms_norm_eps"], rope_theta=w["rope_theta"],
                     tie_word_embeddings=False, bos_token_id=work.BOS_ID, eos_token_id=work.EOS_ID,
                     pad_token_id=work.PAD_ID, torch_dtype="float32", **extra)


def causal_lm(w: dict, seed: int):
  import torch
  from transformers import LlamaForCausalLM
  torch.manual_seed(seed)
  model = LlamaForCausalLM(llama_config(w)).float()
  n = sum(p.numel() for p in model.parameters())
  expected = work.num_params(w["d_model"], w["n_layers"], w["d_ff"])
  if n != expected:
    raise SystemExit(f"policy has {n} parameters, the work's shape {expected}")
  return model


def sequence_classifier(w: dict, seed: int):
  """A value / reward model: the same trunk with a 1-output score head (TRL's get_reward reads it)."""
  import torch
  from transformers import LlamaForSequenceClassification
  torch.manual_seed(seed)
  return LlamaForSequenceClassification(llama_config(w, num_labels=1)).float()


class Timer:
  """Accumulates wall seconds per phase for the current iteration."""

  def __init__(self):
    self.cur: dict[str, float] = {}

  def wrap(self, name: str, fn):
    def timed(*a, **k):
      t = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        self.cur[name] = self.cur.get(name, 0.0) + time.perf_counter() - t
    return timed

  def take(self) -> dict:
    cur, self.cur = self.cur, {}
    return cur


def summary(name: str, w: dict, runs: list[dict], phase_names: list[str]) -> float:
  """Print the phase split, the iterations and (last) s_per_iter_median; return the median."""
  sec = statistics.median(r["total"] for r in runs)
  phases = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in phase_names}
  split = ", ".join(f"{k} {v:.3f} s ({100 * v / sec:.0f}%)" for k, v in phases.items())
  print(f"{name} ({w['algo']}{' long' if w['long'] else ''}) d{w['d_model']} L{w['n_layers']} "
        f"H{w['n_heads']} {w['prompts']}x{w['group']} P{work.PROMPT_LEN}+{w['max_new']}"
        f"{' eos' if w['eos'] else ''}: {sec:.3f} s per iteration (median of {len(runs)}); {split}")
  print("phases=" + json.dumps({k: round(v, 5) for k, v in phases.items()}))
  print("iterations=" + json.dumps([{k: round(v, 5) if isinstance(v, float) else v
                                     for k, v in r.items()} for r in runs]))
  print(f"s_per_iter_median={sec:.6f}", flush=True)
  return sec
