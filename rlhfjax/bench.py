"""Throughput and MFU of the performance-critical paths, as Markdown table rows.

    python -m rlhfjax.bench all                          # matmul peak, sample, sft (defaults below)
    python -m rlhfjax.bench sft --d_model=1024 --n_layers=16 --seq=1024 --batch=16 --dtype=bfloat16
    python -m rlhfjax.bench sample --batch=64 --new_tokens=256 --devices=all

Every run first measures the machine's matmul peak *in the same process* (a jitted square matmul
timed after warmup), and reports achieved FLOP/s as a ratio of it ("MFU vs measured matmul peak"):
on a shared CPU the absolute numbers move with the load, the ratio much less.

FLOP counts are analytic (`TransformerConfig.forward_flops_per_token`: matmuls, 2 FLOPs per
multiply-add, causal attention at half the context on average, LM head included):
  * sft: a training step = forward + backward = 3 x forward (the backward pass computes gradients
    w.r.t. both activations and weights: 2 x forward). Optimizer FLOPs are ignored.
  * sample: prefill = prompt tokens x forward(prompt_len); each decoded token at position t attends
    to t keys, so decode = new tokens x forward(context 2 * prompt + new) (mean key count
    prompt + new/2). Decoding is memory-bound, so its ratio is expected to be far below sft's.

Defaults are sized so `all` takes about two minutes on a 2-core CPU; raise them with flags
(`--batch`, `--seq`, `--d_model`, ...) on an accelerator.

  * rl_step: one RL iteration, timed per phase (sample, score, experience, update); FLOPs = the
    sample's + one forward per model in make_experience + 3 x forward per trained model per epoch.

    python -m rlhfjax.bench rl_step --algo grpo        # seconds per RL iteration split by phase

Later subcommands (`rm_score`, `ppo_update`) are one function each in `BENCHES`.
Heavy imports (JAX, Flax, optax) happen inside the functions so `--help` is instant.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable


def _time_calls(fn: Callable[[], Any], iters: int) -> list[float]:
  """Seconds per call of `fn` (which must return something `block_until_ready` accepts)."""
  import jax
  out = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def _default_matmul_size(platform: str) -> int:
  return 1024 if platform == "cpu" else 8192


def matmul_peak(n: int | None = None, dtypes: tuple[str, ...] | None = None, iters: int = 10,
                device=None) -> dict:
  """FLOP/s of a jitted `n x n @ n x n` matmul per dtype (median of `iters` calls after warmup).

  Args:
    n: matrix size; default 1024 on CPU, 8192 on GPU/TPU.
    dtypes: default ("float32",) on CPU, ("float32", "bfloat16") on GPU/TPU.
    iters: timed calls.
    device: device to run on (default: the first).

  Returns:
    {"n": n, "<dtype>": FLOP/s, ...}.
  """
  import jax
  import jax.numpy as jnp
  device = device or jax.devices()[0]
  n = n or _default_matmul_size(device.platform)
  dtypes = dtypes or (("float32",) if device.platform == "cpu" else ("float32", "bfloat16"))
  result: dict[str, Any] = {"n": n, "platform": device.platform}
  for dt in dtypes:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), dt), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dt), device)
    # HIGHEST: a true f32 matmul (the TPU default would be bf16 passes); the dtype names what ran.
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST
                                         if dt == "float32" else None))
    jax.block_until_ready(mm(a, b))  # compile + warm up
    sec = statistics.median(_time_calls(lambda: mm(a, b), iters))
    result[dt] = 2.0 * n ** 3 / sec
  return result


def bench_model_config(*, vocab: int, d_model: int, n_layers: int, max_len: int, head_dim: int = 64,
                       dtype: str = "float32"):
  """A standard-shaped model: heads = d_model / head_dim, GQA 2:1, SwiGLU width 3 x d_model."""
  from rlhfjax.models.transformer import TransformerConfig
  n_heads = max(1, d_model // head_dim)
  return TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=max(1, n_heads // 2) if n_heads % 2 == 0 else n_heads,
                           head_dim=head_dim, d_ff=3 * d_model, max_len=max_len, dtype=dtype,
                           param_dtype="float32")


def _mesh(devices: str):
  import jax
  from rlhfjax.parallel import create_mesh
  if devices == "all":
    return create_mesh((-1, 1, 1))
  return create_mesh((1, 1, 1), jax.devices()[:1])


def _peak_for(peak: dict, dtype: str) -> float:
  return float(peak.get(dtype) or peak["float32"])


def _memory(compiled) -> dict:
  """Bytes from `compiled.memory_analysis()` (None on backends that do not report it)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not implemented on some backends)
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if getattr(m, k, None) is not None}


def bench_sample(*, peak: dict, d_model: int = 256, n_layers: int = 4, vocab: int = 8192,
                 batch: int = 32, prompt: int = 32, new_tokens: int = 128, steps: int = 2,
                 dtype: str = "float32", devices: str = "one", **_) -> dict:
  """`sampling.generate` throughput: response tokens per second, compile excluded.

  EOS is an id outside the vocabulary, so no row stops early and every call decodes the full
  `new_tokens` (a random model would otherwise stop at a random point).
  """
  import jax
  import jax.numpy as jnp
  from rlhfjax.models.heads import PolicyModel
  from rlhfjax.models.init import init_params
  from rlhfjax.parallel import replicated, shard_batch
  from rlhfjax.sampling import SamplingConfig, generate

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=prompt + new_tokens,
                           dtype=dtype)
  mesh = _mesh(devices)
  params = jax.device_put(init_params(PolicyModel(cfg), jax.random.key(0)), replicated(mesh))
  sc = SamplingConfig(model=cfg, max_new_tokens=new_tokens, eos_id=-1, pad_id=0, temperature=1.0)
  ids = jax.random.randint(jax.random.key(1), (batch, prompt), 1, vocab, jnp.int32)
  ids, mask = (shard_batch(x, mesh) for x in (ids, jnp.ones((batch, prompt), jnp.int32)))
  t = time.perf_counter()
  jax.block_until_ready(generate(params, ids, mask, jax.random.key(2), sc))  # compile + warm up
  compile_s = time.perf_counter() - t
  outs = []

  def call():
    out = generate(params, ids, mask, jax.random.key(3 + len(outs)), sc)
    outs.append(out.mask)
    return out

  sec = statistics.median(_time_calls(call, steps))
  tokens = float(jnp.mean(jnp.stack([m.sum() for m in outs])))
  flops = batch * prompt * cfg.forward_flops_per_token(prompt) + tokens * cfg.forward_flops_per_token(
      2 * prompt + new_tokens)
  achieved = flops / sec
  return {"bench": "sample", "config": f"d{d_model} L{n_layers} V{vocab} B{batch} P{prompt}+{new_tokens} {dtype}",
          "params": cfg.num_params(), "tokens_per_s": tokens / sec, "flops_per_s": achieved,
          "peak_flops_per_s": _peak_for(peak, dtype), "ratio": achieved / _peak_for(peak, dtype),
          "step_s": sec, "compile_s": compile_s, "memory": {}}


def bench_sft(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192, batch: int = 4,
              seq: int = 256, steps: int = 2, dtype: str = "float32", devices: str = "one",
              remat: bool = False, **_) -> dict:
  """The jitted, sharded, donated SFT step (`make_sft_step`) on random tokens: tokens/s and FLOP/s."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from rlhfjax.models.heads import PolicyModel
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.train.sft import make_sft_step
  from rlhfjax.train.state import OptimConfig, create_train_state, make_optimizer

  cfg = dataclasses.replace(bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers,
                                               max_len=seq, dtype=dtype), remat=remat)
  mesh, rules = _mesh(devices), axes.DEFAULT_RULES
  tx = make_optimizer(OptimConfig(warmup_steps=1), steps + 1)
  state, shardings = create_train_state(PolicyModel(cfg), tx, jax.random.key(0), mesh, rules)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 1, vocab, jnp.int32)
  ones = jnp.ones((batch, seq), jnp.int32)
  batch_arrays = shard_batch({"tokens": tokens, "mask": ones, "positions": jnp.cumsum(ones, 1) - 1,
                              "loss_mask": ones.astype(jnp.float32)}, mesh, rules)
  t = time.perf_counter()
  compiled = make_sft_step(cfg, tx, shardings, mesh, rules).lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t
  memory = _memory(compiled)
  state, _ = compiled(state, batch_arrays)  # warm up (the state is donated: rebind it every call)
  jax.block_until_ready(state)

  def call():
    nonlocal state
    state, metrics = compiled(state, batch_arrays)
    return metrics

  sec = statistics.median(_time_calls(call, steps))
  n_tokens = batch * seq
  achieved = 3.0 * cfg.forward_flops_per_token(seq) * n_tokens / sec
  return {"bench": "sft", "config": f"d{d_model} L{n_layers} V{vocab} B{batch} T{seq} {dtype}"
                                    + (" remat" if remat else ""),
          "params": cfg.num_params(), "tokens_per_s": n_tokens / sec, "flops_per_s": achieved,
          "peak_flops_per_s": _peak_for(peak, dtype), "ratio": achieved / _peak_for(peak, dtype),
          "step_s": sec, "compile_s": compile_s, "memory": memory}


def bench_rl_step(*, peak: dict, algo: str = "grpo", d_model: int = 128, n_layers: int = 4,
                  batch: int = 16, group: int = 8, new_tokens: int = 40, steps: int = 3,
                  dtype: str = "float32", devices: str = "one", **_) -> dict:
  """One verifier-reward RL iteration on the arithmetic task, seconds per phase.

  sample (`sampling.generate`, tokens to host) -> score (decode + `math_reward` on the host) ->
  experience (jitted `make_experience`: policy / reference / critic forwards, advantages) ->
  update (jitted, donated `rl_update`: epochs x minibatches). `jax.block_until_ready` after each
  phase, so each is charged its own device time. The policy is freshly initialized and EOS is
  disabled, so every row decodes all `new_tokens` (a random policy would stop at random points);
  `batch` prompts x `group` samples per prompt, one minibatch of all of them.
  """
  import os
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.data.arithmetic import ArithmeticConfig, generate_problems
  from rlhfjax.models.heads import PolicyModel, ValueModel
  from rlhfjax.parallel import axes, replicated, shard_batch
  from rlhfjax.rewards import math_reward
  from rlhfjax.sampling import SamplingConfig, generate
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  from rlhfjax.train.rl import RLConfig, RLState, make_experience_fn, make_rl_update
  from rlhfjax.train.state import create_train_state, make_optimizer

  problems = generate_problems(ArithmeticConfig(), max(batch, 512), seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    train_tokenizer(template_texts(problems), os.path.join(tmp, "tok.model"), vocab_size=96)
    tok = Tokenizer.load(os.path.join(tmp, "tok.model"))
  prompt = 16
  vocab = -(-tok.vocab_size // 8) * 8
  model = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers,
                             max_len=prompt + new_tokens, head_dim=32, dtype=dtype)
  b = batch * group
  cfg = RLConfig(algo=algo, iterations=steps + 1, prompts_per_iter=batch, group_size=group,
                 minibatch_size=b, max_new_tokens=new_tokens)
  mesh, rules = _mesh(devices), axes.DEFAULT_RULES
  ptx, vtx = make_optimizer(cfg.optim(), steps + 1), make_optimizer(cfg.optim(value=True), steps + 1)
  policy, p_sh = create_train_state(PolicyModel(model), ptx, jax.random.key(0), mesh, rules)
  value, v_sh = (None, None)
  if cfg.has_critic:
    value, v_sh = create_train_state(ValueModel(model), vtx, jax.random.key(1), mesh, rules)
  rep = replicated(mesh)
  kl = jax.device_put(cfg.kl_controller().init(), rep)  # placed as rl_update returns it: no recompile
  state = RLState(policy=policy, value=value, kl=kl,
                  iteration=jax.device_put(jnp.zeros((), jnp.int32), rep))
  shardings = RLState(policy=p_sh, value=v_sh, kl=jax.tree.map(lambda _: rep, kl), iteration=rep)
  ref = jax.tree.map(jnp.copy, policy.params)
  experience_fn = make_experience_fn(cfg, model, mesh, rules)
  update_fn = make_rl_update(cfg, model, ptx, vtx, shardings, mesh, rules)
  sc = SamplingConfig(model=model, max_new_tokens=new_tokens, eos_id=-1, pad_id=tok.pad_id,
                      temperature=1.0)

  def iteration(i: int) -> dict:
    nonlocal state
    exs = [problems[(i * batch + j) % len(problems)] for j in range(batch) for _ in range(group)]
    ids, mask = tok.encode_prompts([e["prompt"] for e in exs], prompt)
    ids, mask = shard_batch((ids, mask), mesh, rules)
    t0 = time.perf_counter()
    out = generate(state.policy.params, ids, mask, jax.random.key(10 + i), sc)
    tokens, resp_mask = jax.device_get((out.tokens, out.mask))
    t1 = time.perf_counter()
    texts = tok.decode_batch(np.asarray(tokens), np.asarray(resp_mask))
    scores = jnp.asarray(math_reward(texts, [e["answer"] for e in exs]))
    t2 = time.perf_counter()
    rollout = {"prompt_ids": ids, "prompt_mask": mask, "response_ids": out.tokens,
               "response_mask": out.mask, "finished": out.finished}
    vparams = state.value.params if cfg.has_critic else None
    exp, _ = jax.block_until_ready(experience_fn(state.policy.params, ref, vparams, rollout, scores,
                                                 state.kl.value))
    t3 = time.perf_counter()
    state, metrics = jax.block_until_ready(update_fn(state, exp, jax.random.key(100 + i)))
    t4 = time.perf_counter()
    return {"sample": t1 - t0, "score": t2 - t1, "experience": t3 - t2, "update": t4 - t3}

  t = time.perf_counter()
  iteration(0)  # compile + warm up
  compile_s = time.perf_counter() - t
  runs = [iteration(i + 1) for i in range(steps)]
  phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  sec = sum(phases.values())
  seq = prompt + new_tokens
  n_models = 3 if cfg.has_critic else 2  # experience: policy + reference (+ critic) forwards
  flops = (b * prompt * model.forward_flops_per_token(prompt)
           + b * new_tokens * model.forward_flops_per_token(2 * prompt + new_tokens)
           + n_models * b * seq * model.forward_flops_per_token(seq)
           + cfg.epochs * 3 * (n_models - 1) * b * seq * model.forward_flops_per_token(seq))
  achieved = flops / sec
  split = ", ".join(f"{k} {v:.3f} s ({100 * v / sec:.0f}%)" for k, v in phases.items())
  return {"bench": "rl_step", "config": f"{algo} d{d_model} L{n_layers} V{vocab} {batch}x{group} "
                                        f"P{prompt}+{new_tokens} {dtype}",
          "params": model.num_params(), "tokens_per_s": b * new_tokens / sec, "flops_per_s": achieved,
          "peak_flops_per_s": _peak_for(peak, dtype), "ratio": achieved / _peak_for(peak, dtype),
          "step_s": sec, "compile_s": compile_s, "memory": {}, "phases": phases,
          "lines": [f"rl_step ({algo}) seconds per iteration: {sec:.3f} s = {split}"]}


BENCHES: dict[str, Callable[..., dict]] = {
    "sample": bench_sample,
    "sft": bench_sft,
    "rl_step": bench_rl_step,
}

# Benchmarks that live in their own modules (cheap imports: JAX is imported inside the functions).
from rlhfjax.bench_ppo import bench_ppo_update  # noqa: E402

BENCHES["ppo_update"] = bench_ppo_update


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


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description="rlhfjax throughput / MFU benchmarks (Markdown rows).")
  p.add_argument("which", choices=[*BENCHES, "all"])
  p.add_argument("--d_model", type=int)
  p.add_argument("--n_layers", type=int)
  p.add_argument("--vocab", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--seq", type=int, help="sft: sequence length")
  p.add_argument("--prompt", type=int, help="sample: prompt length")
  p.add_argument("--new_tokens", type=int, help="sample: tokens generated per row")
  p.add_argument("--steps", type=int, help="timed calls after one warm-up call (median reported)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="model compute dtype")
  p.add_argument("--devices", choices=["one", "all"], help="one-device mesh (default) or all devices")
  p.add_argument("--remat", action="store_true", default=None, help="sft: rematerialize layers")
  p.add_argument("--matmul_n", type=int, help="matmul peak size (default 1024 CPU / 8192 accelerators)")
  p.add_argument("--algo", choices=["ppo", "grpo", "rloo", "reinforce_pp", "best_of_n"],
                 help="rl_step: the RL algorithm")
  p.add_argument("--group", type=int, help="rl_step: samples per prompt (--batch = prompts)")
  args = p.parse_args(argv)
  overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("which", "matmul_n")}

  import jax
  peak = matmul_peak(args.matmul_n)
  print(f"<!-- {jax.devices()[0].device_kind}, {jax.device_count()} device(s), jax {jax.__version__} -->")
  print(HEADER)
  for line in peak_rows(peak):
    print(line, flush=True)
  results = []
  for name in (list(BENCHES) if args.which == "all" else [args.which]):
    r = BENCHES[name](peak=peak, **overrides)
    results.append(r)
    print(row(r), flush=True)
  for r in results:
    if line := memory_line(r):
      print(line)
    for line in r.get("lines", ()):
      print(line)
  return results


if __name__ == "__main__":
  main()
