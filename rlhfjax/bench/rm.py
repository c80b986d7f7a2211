"""`rm_score`: reward-model scoring throughput and FLOP/s vs the matmul peak.

Times the jitted `rlhfjax.rewards.scorers.score` (or `ensemble_score` with `--ensemble N`) on random
full-length sequences, batch sharded over the mesh's data axes; the row dict gains `responses_per_s`.

FLOPs: a forward pass over `batch x seq` tokens (`TransformerConfig.forward_flops_per_token(seq,
lm_head=False)` plus the [D] -> 1 head; the head is applied at every position), times N members.

    python -m rlhfjax.bench rm_score                   # d256 L4 B64 T256
    python -m rlhfjax.bench rm_score --ensemble=4 --devices=all
"""

from __future__ import annotations

import statistics
import time

from rlhfjax.bench.common import bench_model_config, make_mesh, result, shape_tag, time_calls


def bench_rm_score(*, peak: dict, d_model: int = 256, n_layers: int = 4, vocab: int = 8192,
                   head_dim: int = 64, d_ff: int | None = None, batch: int = 64, seq: int = 256,
                   steps: int = 3, dtype: str = "float32", devices: str = "one", ensemble: int = 1,
                   **_) -> dict:
  """Responses scored per second by the reward model (compile excluded)."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import RewardModel, init_params
  from rlhfjax.parallel import replicated, shard_batch
  from rlhfjax.rewards.scorers import ensemble_score, score

  cfg = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=seq,
                           head_dim=head_dim, d_ff=d_ff, dtype=dtype)
  mesh = make_mesh(devices)
  keys = jax.random.split(jax.random.key(0), ensemble)
  if ensemble > 1:
    params = jax.vmap(lambda k: init_params(RewardModel(cfg), k))(keys)
    fn = lambda p, t, m: ensemble_score(p, t, m, 1.0, model_cfg=cfg)["penalized"]  # noqa: E731
  else:
    params = init_params(RewardModel(cfg), keys[0])
    fn = lambda p, t, m: score(p, t, m, model_cfg=cfg)  # noqa: E731
  params = jax.device_put(params, replicated(mesh))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 4, vocab, jnp.int32)
  tokens, mask = (shard_batch(x, mesh) for x in (tokens, jnp.ones((batch, seq), jnp.int32)))
  t = time.perf_counter()
  jax.block_until_ready(fn(params, tokens, mask))  # compile + warm up
  compile_s = time.perf_counter() - t
  sec = statistics.median(time_calls(lambda: fn(params, tokens, mask), steps))
  per_token = cfg.forward_flops_per_token(seq, lm_head=False) + 2 * d_model  # [D] -> 1 reward head
  return result("rm_score",
                f"{shape_tag(d_model, n_layers, vocab, head_dim, d_ff)} B{batch} T{seq} {dtype}"
                + (f" N{ensemble}" if ensemble > 1 else ""),
                params=cfg.num_params() * ensemble, tokens_per_s=batch * seq / sec,
                flops_per_s=ensemble * batch * seq * per_token / sec, peak=peak, dtype=dtype,
                step_s=sec, compile_s=compile_s, responses_per_s=batch / sec)
