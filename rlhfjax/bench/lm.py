"""Language-model benches: `sample` (`sampling.generate`) and `sft` (the jitted SFT step).

FLOP counts are analytic (`TransformerConfig.forward_flops_per_token`):
  * sft: a training step = forward + backward = 3 x forward (the backward pass computes gradients
    w.r.t. both activations and weights: 2 x forward). Optimizer FLOPs are ignored.
  * sample: prefill = prompt tokens x forward(prompt_len); each decoded token at position t attends
    to t keys, so decode = new tokens x forward(context 2 * prompt + new) (mean key count
    prompt + new/2). Decoding is memory-bound, so its ratio is expected to be far below sft's.
"""

from __future__ import annotations

import statistics
import time

from rlhfjax.bench.common import (bench_model_config, compiled_memory, make_mesh, result,
                                  time_calls)


def bench_sample(*, peak: dict, d_model: int = 256, n_layers: int = 4, vocab: int = 8192,
                 batch: int = 32, prompt: int = 32, new_tokens: int = 128, steps: int = 2,
                 dtype: str = "float32", devices: str = "one", **_) -> dict:
  """`sampling.generate` throughput: response tokens per second, compile excluded.

  EOS is an id outside the vocabulary, so no row stops early and every call decodes the full
  `new_tokens` (a random model would otherwise stop at a random point).
  """
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import PolicyModel, init_params
  from rlhfjax.parallel import replicated, shard_batch
  from rlhfjax.sampling import SamplingConfig, generate

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=prompt + new_tokens,
                           dtype=dtype)
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
  flops = batch * prompt * cfg.forward_flops_per_token(prompt) + tokens * cfg.forward_flops_per_token(
      2 * prompt + new_tokens)
  return result("sample", f"d{d_model} L{n_layers} V{vocab} B{batch} P{prompt}+{new_tokens} {dtype}",
                params=cfg.num_params(), tokens_per_s=tokens / sec, flops_per_s=flops / sec,
                peak=peak, dtype=dtype, step_s=sec, compile_s=compile_s)


def bench_sft(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192, batch: int = 4,
              seq: int = 256, steps: int = 2, dtype: str = "float32", devices: str = "one",
              remat: bool = False, **_) -> dict:
  """The jitted, sharded, donated SFT step (`make_sft_step`) on random tokens: tokens/s and FLOP/s."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import PolicyModel
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.train.sft import make_sft_step
  from rlhfjax.train.state import OptimConfig, create_train_state, make_optimizer

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=seq, dtype=dtype,
                           remat=remat)
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
  return result("sft", f"d{d_model} L{n_layers} V{vocab} B{batch} T{seq} {dtype}" + (" remat" if remat else ""),
                params=cfg.num_params(), tokens_per_s=n_tokens / sec,
                flops_per_s=3.0 * cfg.forward_flops_per_token(seq) * n_tokens / sec, peak=peak,
                dtype=dtype, step_s=sec, compile_s=compile_s, memory=memory)
