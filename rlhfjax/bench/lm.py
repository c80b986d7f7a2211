"""Language-model benches: `sample` (`sampling.generate`) and `sft` (the jitted SFT step).

FLOP counts are analytic (`TransformerConfig.forward_flops_per_token`):
  * sft: a training step = forward + backward = 3 x forward (the backward pass computes gradients
    w.r.t. both activations and weights: 2 x forward). Optimizer FLOPs are ignored.
  * sample: prefill = prompt tokens x forward(prompt_len), which gives the first new token; each
    later one is a decode step whose token at position t attends to t keys, so decode = (new tokens
    - rows) x forward(context 2 * prompt + new) (mean key count prompt + new/2). Decoding is memory-bound, so its ratio is expected to be far below sft's.

Decode is also set against the HBM roofline (`decode_roofline`): each step reads every weight as
stored plus the filled KV-cache slots, at the memory bandwidth measured in the same run
(`common.memory_bandwidth`); an extra line gives achieved / roofline tokens/s.

    python -m rlhfjax.bench sft --size=1b --dtype=bfloat16 --batch=16 --seq=1024
    python -m rlhfjax.bench sample --size=1b --dtype=bfloat16 --param_dtype=bfloat16 --batch=128
"""

from __future__ import annotations

import statistics
import time

from rlhfjax.bench.common import (bench_model_config, compiled_memory, make_mesh, memory_bandwidth,
                                  remat_tag, result, shape_tag, time_calls)


def decode_roofline(cfg, *, batch: int, prompt: int, new_tokens: int, weight_bytes: float,
                    bandwidth: float) -> dict:
  """The HBM bound of decoding `new_tokens` for `batch` rows. The prefill's logits give the first
  token; each of the `new_tokens - 1` decode steps after it reads all weights once (`weight_bytes`,
  as stored; the tied LM head is the embedding) and each row's keys and values of the filled cache
  slots in the compute dtype (prompt + s + 1 at step s: mean prompt + new_tokens / 2).
  tokens/s = batch x new_tokens x `bandwidth` (bytes/s) / ((new_tokens - 1) x bytes per step)."""
  kv_per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.compute_dtype.itemsize
  kv = batch * kv_per_slot * (prompt + new_tokens / 2)
  step = weight_bytes + kv
  return {"weight_bytes": float(weight_bytes), "kv_bytes": float(kv), "bytes_per_step": float(step),
          "tokens_per_s": batch * new_tokens * bandwidth / (max(new_tokens - 1, 1) * step)}


def bench_sample(*, peak: dict, d_model: int = 256, n_layers: int = 4, vocab: int = 8192,
                 head_dim: int = 64, d_ff: int | None = None, batch: int = 32, prompt: int = 32,
                 new_tokens: int = 128, steps: int = 2, dtype: str = "float32",
                 param_dtype: str = "float32", devices: str = "one", bandwidth_mib: int | None = None,
                 **_) -> dict:
  """`sampling.generate` throughput: response tokens per second, compile excluded; and against the
  HBM roofline (`decode_roofline`, prefill inside the timed call) at the bandwidth measured here.

  EOS is an id outside the vocabulary, so no row stops early and every call decodes the full
  `new_tokens` (a random model would otherwise stop at a random point). `param_dtype`: the weights'
  storage (float32 as the RL loop samples its master weights; bfloat16 as an inference server).
  """
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import PolicyModel, init_params
  from rlhfjax.parallel import replicated, shard_batch
  from rlhfjax.sampling import SamplingConfig, generate

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=prompt + new_tokens,
                           head_dim=head_dim, d_ff=d_ff, dtype=dtype, param_dtype=param_dtype)
  mesh = make_mesh(devices)
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

  sec = statistics.median(time_calls(call, steps))
  tokens = float(jnp.mean(jnp.stack([m.sum() for m in outs])))
  flops = batch * prompt * cfg.forward_flops_per_token(prompt) + (
      tokens - batch) * cfg.forward_flops_per_token(2 * prompt + new_tokens)
  # With --devices=all each device decodes batch / devices rows over its own (replicated) weights.
  n_dev = mesh.devices.size
  bandwidth, memory_bytes = memory_bandwidth(bandwidth_mib)
  roof = decode_roofline(cfg, batch=batch // n_dev, prompt=prompt, new_tokens=new_tokens,
                         weight_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                         bandwidth=bandwidth)
  roof_tps = n_dev * roof["tokens_per_s"]
  ratio = tokens / sec / roof_tps
  mb = lambda x: f"{x / 1e9:.3g} GB" if x >= 1e8 else f"{x / 1e6:.3g} MB"  # noqa: E731
  lines = [f"sample: decode {tokens / sec:,.0f} tokens/s = {100 * ratio:.1f}% of the HBM roofline "
           f"{roof_tps:,.0f} tokens/s = {batch // n_dev} rows x {bandwidth / 1e9:,.0f} GB/s (measured: "
           f"x + 1 over {mb(memory_bytes)}) / {mb(roof['bytes_per_step'])} per step (weights "
           f"{mb(roof['weight_bytes'])} {param_dtype} + KV cache {mb(roof['kv_bytes'])} at the mean "
           f"{prompt + new_tokens / 2:g} filled slots; {new_tokens - 1} steps for {new_tokens} tokens)" + (f" x {n_dev} devices" if n_dev > 1 else "")
           + "; prefill inside the timed call"]
  return result("sample", f"{shape_tag(d_model, n_layers, vocab, head_dim, d_ff)} B{batch} "
                f"P{prompt}+{new_tokens} {dtype}" + (f" weights {param_dtype}" if param_dtype != dtype else ""),
                params=cfg.num_params(), tokens_per_s=tokens / sec, flops_per_s=flops / sec,
                peak=peak, dtype=dtype, step_s=sec, compile_s=compile_s, lines=lines,
                hbm_bytes_per_s=bandwidth, roofline_tokens_per_s=roof_tps, roofline_ratio=ratio,
                bytes_per_step=roof["bytes_per_step"])


def bench_sft(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192,
              head_dim: int = 64, d_ff: int | None = None, batch: int = 4, seq: int = 256,
              steps: int = 2, dtype: str = "float32", devices: str = "one", remat: bool | str = False,
              attention: str = "einsum", **_) -> dict:
  """The jitted, sharded, donated SFT step (`make_sft_step`) on random tokens: tokens/s and FLOP/s."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import PolicyModel
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.train.sft import make_sft_step
  from rlhfjax.train.state import OptimConfig, create_train_state, make_optimizer

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=seq,
                           head_dim=head_dim, d_ff=d_ff, dtype=dtype, remat=remat, attention=attention)
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  tx = make_optimizer(OptimConfig(warmup_steps=1), steps + 1)
  state, shardings = create_train_state(PolicyModel(cfg), tx, jax.random.key(0), mesh, rules)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 1, vocab, jnp.int32)
  ones = jnp.ones((batch, seq), jnp.int32)
  batch_arrays = shard_batch({"tokens": tokens, "mask": ones, "positions": jnp.cumsum(ones, 1) - 1,
                              "loss_mask": ones.astype(jnp.float32)}, mesh, rules)
  t = time.perf_counter()
  compiled = make_sft_step(cfg, tx, shardings, mesh, rules).lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t
  memory = compiled_memory(compiled)
  state, _ = compiled(state, batch_arrays)  # warm up (the state is donated: rebind it every call)
  jax.block_until_ready(state)

  def call():
    nonlocal state
    state, metrics = compiled(state, batch_arrays)
    return metrics

  sec = statistics.median(time_calls(call, steps))
  n_tokens = batch * seq
  return result("sft", f"{shape_tag(d_model, n_layers, vocab, head_dim, d_ff)} B{batch} T{seq} {dtype}"
                + remat_tag(remat) + ("" if attention == "einsum" else f" attention={attention}"),
                params=cfg.num_params(), tokens_per_s=n_tokens / sec,
                flops_per_s=3.0 * cfg.forward_flops_per_token(seq) * n_tokens / sec, peak=peak,
                dtype=dtype, step_s=sec, compile_s=compile_s, memory=memory)
