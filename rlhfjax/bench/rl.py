"""RL benches: `rl_step` (one whole RL iteration, by phase), `rl_iteration` (the same loop on the
peer-benchmark work of `peer_work.py`, benchmarks/peers/) and `ppo_update` (the jitted PPO update).

All three build the RL core as the `rl` / `ppo` stages do: `builtin_models`, `RLOptimConfig.optimizers`,
`init_rl_state`, `make_experience_fn`, `make_rl_update` (`make_rl_update_shard_map` with
`--variant=shard_map`).

FLOPs (analytic, `TransformerConfig.forward_flops_per_token`, 2 per multiply-add):
  * rl_step: the sample's (as `sample`) + one forward per model make_experience runs (the
    policy unless `AlgoConfig.on_policy`, the reference with a KL term, PPO's critic) + 3 x
    forward per trained model per epoch.
  * rl_iteration: as it ran (longest response, trimmed width): prefill + decode, the forwards
    make_experience runs (as rl_step; + the reward model, no LM head), 3 x forward per trained
    model per epoch.
  * ppo_update: per epoch 3 x forward for the policy (LM head included) and for the critic (no LM
    head) over `batch x (seq - 1)` tokens (the last one predicts nothing); optimizer and element-wise work not counted.
    make_experience is timed separately and reported on an extra line.

    python -m rlhfjax.bench rl_step --algo grpo        # seconds per RL iteration split by phase
    python -m rlhfjax.bench ppo_update                 # d512 L8 T256, 8 sequences, 1 epoch
    python -m rlhfjax.bench ppo_update --batch=16 --epochs=2 --minibatch=8 --dtype=bfloat16
    python -m rlhfjax.bench ppo_update --epochs=4 --minibatch=4 --variant=shard_map --devices=all
"""

from __future__ import annotations

import statistics
import time

from rlhfjax.bench.common import (bench_model_config, compiled_memory, make_mesh, matmul_peak,
                                  peak_for, remat_fields, remat_tag, result, shape_tag,
                                  time_calls)


def rl_core(algo, model_cfg, optim, total_steps: int, mesh, rules, *, variant: str = "jit",
            temperature: float = 1.0, ref_key=None):
  """(state, reference params, jitted experience fn, jitted update) of the built-in transformer:
  the policy from key 0 (the reference a copy of it, or freshly initialized from `ref_key`), PPO's
  critic fresh."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import init_params
  from rlhfjax.train.rl import init_rl_state, make_experience_fn, make_rl_update, rl_state_shardings
  from rlhfjax.train.rl_shard_map import make_rl_update_shard_map
  from rlhfjax.train.rl_stage import builtin_models

  if variant not in ("jit", "shard_map"):
    raise ValueError(f"variant must be jit or shard_map, got {variant!r}")
  models = builtin_models(model_cfg, algo)
  ptx, vtx = optim.optimizers(total_steps)
  policy_params = init_params(models.policy, jax.random.key(0))
  state = init_rl_state(models, algo, ptx, vtx, mesh, rules, jax.random.key(1), policy_params)
  _, shardings = rl_state_shardings(models, algo, ptx, vtx, mesh, rules)
  # A copy on the policy's shardings: the update donates the state, the reference must survive it.
  ref = jax.tree.map(jnp.copy, {k: v for k, v in state.policy.params.items() if k != "value_head"})
  if ref_key is not None:
    ref = jax.device_put(init_params(models.policy, ref_key), jax.tree.map(lambda x: x.sharding, ref))
  experience_fn = make_experience_fn(algo, models, mesh, rules, temperature=temperature)
  make = make_rl_update_shard_map if variant == "shard_map" else make_rl_update
  update_fn = make(algo, models, ptx, vtx, shardings, mesh, rules, temperature=temperature)
  return state, ref, experience_fn, update_fn


PHASES = ("sample", "score", "experience", "update")


def hf_init(params, key, std: float = 0.02):
  """`params` re-drawn as a Hugging Face Llama initializes them (`initializer_range` 0.02): every
  weight N(0, std), norm scales and biases kept (ones / zeros); on the same devices as `params`.

  The peers' models are fresh `LlamaForCausalLM`s; the same init distribution gives the same
  logit scale and so the same EOS rate and response lengths as theirs, i.e. the same work.
  """
  import jax

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))

  def draw(path, x, k):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale" or "bias" in name:
      return x
    return jax.device_put((std * jax.random.normal(k, x.shape)).astype(x.dtype), x.sharding)

  return jax.tree_util.tree_unflatten(treedef, [draw(p, x, k) for (p, x), k in zip(leaves, keys)])


def response_widths(n: int) -> list[int]:
  """Every response width `trim_rollout` can cut an `n`-token budget to (16, 24, 32, 48, ..., n)."""
  from rlhfjax.models.sequence import width_buckets

  return width_buckets(n)


def run_iterations(state, ref, experience_fn, update_fn, cfg, sc, mesh, rules, batch, score,
                   steps: int, *, warmup: int = 1, trim: bool = False, profile: str | None = None):
  """(state, per-iteration dicts, warm-up seconds) of `warmup` untimed then `steps` timed RL
  iterations: sample -> score -> experience -> update, each blocked until ready (`RLStage.step`
  runs the experience forwards during the scoring; here each phase is timed alone).

  `batch(i) -> (prompt ids, prompt mask, examples)` (host arrays); `score(tokens, mask, examples,
  rollout) -> [B] scores` (host tokens / mask of the sample). With `trim`, the rollout's response
  axis is cut to the longest response (`trim_rollout`) before the forwards, and the warm-up compiles
  experience and update at every width trimming can give, so no timed iteration compiles; with
  `cfg.pack` the rollout is packed instead (`pack_rollout`) and the warm-up compiles every row count.
  Each dict: the phases' seconds, `total` (prompts encoded to update done), `width` (response
  columns the forwards saw), `rows` (rows they saw: packed rows, else the batch), `decoded`
  (the longest response: the prefill gave its first token, decode steps the rest) and
  `response_tokens`. With `profile`, one more iteration after the timed ones, not counted, is
  traced into that directory (`jax.profiler.trace`: xprof / TensorBoard's profile plugin).
  """
  import jax
  import numpy as np
  from rlhfjax.parallel import shard_batch
  from rlhfjax.models.sequence import Packing, packed_row_counts, width_buckets
  from rlhfjax.parallel import replicated
  from rlhfjax.sampling import Rollout, generate
  from rlhfjax.train.rl import batch_shards, cut_responses, pack_rollout

  def forwards(rollout, scores, i):
    nonlocal state
    vparams = state.value.params if cfg.separate_critic else None
    exp, _ = jax.block_until_ready(experience_fn(state.policy.params, ref, vparams, rollout, scores,
                                                 state.kl.value))
    t = time.perf_counter()
    state, _ = jax.block_until_ready(update_fn(state, exp, jax.random.key(100 + i)))
    return t

  def iteration(i: int, widths=(), row_counts=()) -> dict:
    ts = time.perf_counter()
    ids, mask, exs = batch(i)
    ids, mask = shard_batch((ids, mask), mesh, rules)
    t0 = time.perf_counter()
    out = generate(state.policy.params, ids, mask, jax.random.key(10 + i), sc)
    tokens, resp_mask = jax.device_get((out.tokens, out.mask))
    t1 = time.perf_counter()
    rollout = Rollout.from_sample(ids, mask, out)
    scores = jax.block_until_ready(score(tokens, resp_mask, exs, rollout))
    t2 = time.perf_counter()
    for w in widths:  # warm-up only: compile every width a timed iteration may trim to
      forwards(cut_responses(rollout, w), scores, i)
    for r, t in row_counts:  # warm-up only: every packed row shape (empty rows: only shapes matter)
      forwards(rollout.replace(packing=jax.device_put(Packing(
          src=np.full((r, t), -1, np.int32), dst=np.full(rollout.response_ids.shape, -1, np.int32),
          segments=np.zeros((r, t), np.int32)), replicated(mesh))), scores, i)
    if trim:
      rollout = pack_rollout(rollout, cfg, mesh, rules)
    t3 = forwards(rollout, scores, i)
    t4 = time.perf_counter()
    lengths = np.asarray(resp_mask).sum(1)
    return {"sample": t1 - t0, "score": t2 - t1, "experience": t3 - t2, "update": t4 - t3,
            "total": t4 - ts, "width": int(rollout.response_ids.shape[1]),
            "rows": int(rollout.packing.src.shape[0] if rollout.packing is not None else b),
            # columns a row of the forwards after sampling has (a padded row: prompt + response
            # but its last token, `predicting_inputs`)
            "slots": int(rollout.packing.src.shape[1] if rollout.packing is not None
                         else rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1] - 1),
            "decoded": int(lengths.max()), "response_tokens": float(lengths.sum())}

  t = time.perf_counter()
  widths = response_widths(sc.max_new_tokens) if trim and not cfg.packs else ()
  ids = batch(0)[0]
  (b, p), n = ids.shape, sc.max_new_tokens
  shards = batch_shards(b, mesh, rules)
  row_counts = []  # (rows, slots) of every packed shape a timed iteration may meet
  if trim and cfg.pack:
    row_counts = [(r, p + n) for r in packed_row_counts(b, shards)]
  elif trim and cfg.share_prompt:
    groups = -(-b // cfg.group_size // shards) * shards
    row_counts = [(groups, w) for w in width_buckets(p - 1 + cfg.group_size * n)]
  for i in range(warmup):  # compile + warm up
    iteration(i, widths if i == 0 else (), row_counts if i == 0 else ())
  compile_s = time.perf_counter() - t
  runs = [iteration(warmup + i) for i in range(steps)]
  if profile:
    with jax.profiler.trace(profile):
      iteration(warmup + steps)
  return state, runs, compile_s


def bench_rl_step(*, peak: dict, algo: str = "grpo", d_model: int = 128, n_layers: int = 4,
                  batch: int = 16, group: int = 8, new_tokens: int = 40, steps: int = 3,
                  epochs: int = 1, minibatch: int = 0, microbatch: int = 0, variant: str = "jit",
                  dtype: str = "float32", devices: str = "one", **_) -> dict:
  """Seconds per phase of one verifier-reward RL iteration on the arithmetic task: sample -> score
  (decode + `math_reward` on the host) -> experience -> update, each blocked until ready.

  A fresh policy with EOS disabled decodes all `new_tokens` for `batch` prompts x `group` samples;
  one minibatch of all of them unless `minibatch`.
  """
  import os
  import tempfile

  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.data.arithmetic import ArithmeticConfig, generate_problems
  from rlhfjax.parallel import axes
  from rlhfjax.rewards import math_reward
  from rlhfjax.sampling import SamplingConfig
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  problems = generate_problems(ArithmeticConfig(), max(batch, 512), seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    train_tokenizer(template_texts(problems), os.path.join(tmp, "tok.model"), vocab_size=96)
    tok = Tokenizer.load(os.path.join(tmp, "tok.model"))
  prompt = 16
  vocab = -(-tok.vocab_size // 8) * 8
  model = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers,
                             max_len=prompt + new_tokens, head_dim=32, dtype=dtype)
  b = batch * group
  cfg = AlgoConfig(algo=algo, group_size=group, epochs=epochs, minibatch_size=minibatch or b,
                   microbatch_size=microbatch)
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  sc = SamplingConfig(model=model, max_new_tokens=new_tokens, eos_id=-1, pad_id=tok.pad_id,
                      temperature=1.0)
  state, ref, experience_fn, update_fn = rl_core(cfg, model, RLOptimConfig(), steps + 1, mesh, rules,
                                                 variant=variant, temperature=sc.temperature)

  def prompts_of(i: int):
    exs = [problems[(i * batch + j) % len(problems)] for j in range(batch) for _ in range(group)]
    ids, mask = tok.encode_prompts([e["prompt"] for e in exs], prompt)
    return ids, mask, exs

  def score(tokens, resp_mask, exs, rollout):
    texts = tok.decode_batch(np.asarray(tokens), np.asarray(resp_mask))
    return jnp.asarray(math_reward(texts, [e["answer"] for e in exs]))

  state, runs, compile_s = run_iterations(state, ref, experience_fn, update_fn, cfg, sc, mesh, rules,
                                          prompts_of, score, steps)
  phases = {k: statistics.median(r[k] for r in runs) for k in PHASES}
  sec = sum(phases.values())
  seq = prompt + new_tokens - 1  # the forwards after sampling skip the last token (`predicting_inputs`)
  # experience: the policy (unless on-policy), the reference (with a KL term), the critic (PPO)
  n_models = (not cfg.on_policy(b)) + cfg.uses_reference + cfg.has_critic
  flops = (b * prompt * model.forward_flops_per_token(prompt)
           + b * (new_tokens - 1) * model.forward_flops_per_token(2 * prompt + new_tokens)
           + n_models * b * seq * model.forward_flops_per_token(seq)
           + cfg.epochs * 3 * (1 + cfg.has_critic) * b * seq * model.forward_flops_per_token(seq))
  split = ", ".join(f"{k} {v:.3f} s ({100 * v / sec:.0f}%)" for k, v in phases.items())
  extra = "".join([f" E{epochs}" if epochs != 1 else "", f" mb{minibatch}" if minibatch else "",
                   f" {variant}" if variant != "jit" else ""])
  return result("rl_step", f"{algo} d{d_model} L{n_layers} V{vocab} {batch}x{group} "
                           f"P{prompt}+{new_tokens} {dtype}{extra}",
                params=model.num_params(), tokens_per_s=b * new_tokens / sec, flops_per_s=flops / sec,
                peak=peak, dtype=dtype, step_s=sec, compile_s=compile_s, phases=phases,
                lines=[f"rl_step ({algo}) seconds per iteration: {sec:.3f} s = {split}"])


def bench_rl_iteration(*, peak: dict, algo: str = "grpo", d_model: int | None = None,
                       n_layers: int | None = None, n_heads: int | None = None, vocab="arith16",
                       prompts: int | None = None, group: int | None = None,
                       max_new: int | None = None, steps: int = 5, warmup: int = 1,
                       long: bool = False, devices: str = "one", recompute_logprobs: bool = False,
                       pack: bool | None = None, share_prompt: bool | None = None,
                       remat: bool | str | None = None, sampler_logprobs: bool | None = None,
                       per_layer_update: bool = True, profile: str | None = None, **_) -> dict:
  """Seconds per RL iteration on the peer-benchmark work (`rlhfjax.bench.peer_work`; the same work
  the scripts in benchmarks/peers/ give TRL and Tunix): sample -> score -> experience -> update.

  GRPO: `prompts` x `group` samples, the verifier reward, KL in the loss, one AdamW step on the
  whole batch. PPO: `prompts` episodes scored by a reward model, a reference, critic and reward
  model each initialized differently from the policy, 4 epochs x 4 minibatches. Unset flags take
  the work's values (d256 L4 H4, 16-token vocabulary, 16 new tokens, EOS disabled); `long`: 256
  new tokens with EOS on, the response axis trimmed as in `RLStage.step`. `vocab` is the work's
  tokenizer, "arith16" (an int, as `all` may pass, is ignored as by rl_step). `recompute_logprobs`:
  the old log-probs from their own forward even when on-policy (the path before the reuse).
  `pack` (`rl.pack`; default: on for long GRPO, whose one minibatch allows it): the forwards run
  over packed rows of real tokens instead of the trimmed padded batch. `share_prompt`
  (`rl.share_prompt`; default: on for short GRPO, off with `pack`): one row per group, its prompt
  once (on the long work packing is faster: a shared row holds one group). `remat`: layers
  rematerialized in the backward pass, keeping what `model.remat_policy` says (`common.remat_fields`;
  default "dots" for GRPO, ~5 % faster than without remat on the 2-core CPU; none for PPO, whose
  16 minibatch steps of 16 rows ran their update 4-5 % faster without, 2026-12-07).
  `sampler_logprobs` (`rl.sampler_logprobs`; default: on for PPO, whose off-policy minibatches read
  the old log-probs, as TRL's PPOTrainer takes them from the generation's logits; off for GRPO,
  on-policy unless `recompute_logprobs`): no policy forward in the experience phase.
  `per_layer_update` (`rl.per_layer_update`; default on: ~10 % off PPO's update here; packed and
  shared-prompt rows, the GRPO defaults, ignore it): the update per layer, its last layer on the
  predicting columns only.
  Compile excluded: `warmup` untimed iterations first (with `long`, compiling every trimmed width
  or packed row count). `profile`: a directory one more iteration, after the timed ones and not
  counted, is traced into (`run_iterations`).
  """
  import json

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.bench import peer_work as work
  from rlhfjax.models.heads import RewardModel
  from rlhfjax.models.init import init_params
  from rlhfjax.models.transformer import BAND_CHUNK, TransformerConfig
  from rlhfjax.parallel import axes, replicated
  from rlhfjax.rewards.scorers import score as rm_score
  from rlhfjax.sampling import SamplingConfig
  from rlhfjax.sampling.sampler import prefill_group
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  if isinstance(vocab, str) and vocab != "arith16":
    raise ValueError(f"rl_iteration: --vocab must be arith16 (the work's 16-token tokenizer), got {vocab!r}")
  w = work.workload(algo, long)
  d_model = d_model or w["d_model"]
  n_layers = n_layers or w["n_layers"]
  n_heads = n_heads or w["n_heads"]
  prompts = prompts or w["prompts"]
  group = group or w["group"]
  max_new = max_new or w["max_new"]
  if d_model % n_heads:
    raise ValueError(f"rl_iteration: d_model={d_model} is not a multiple of n_heads={n_heads}")
  p, v = work.PROMPT_LEN, len(work.VOCAB)
  model = TransformerConfig(vocab_size=v, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            n_kv_heads=n_heads, head_dim=d_model // n_heads,
                            d_ff=w["d_ff"] * d_model // w["d_model"], max_len=p + max_new,
                            rope_base=w["rope_theta"], norm_eps=w["rms_norm_eps"],
                            tie_embeddings=w["tie_embeddings"], embed_scale=False, dtype=w["dtype"],
                            **remat_fields(remat := ("none" if algo == "ppo" else "dots")
                                           if remat is None else remat))
  b = prompts * group
  if algo == "grpo":
    cfg = AlgoConfig(algo="grpo", group_size=group, epochs=w["epochs"], minibatch_size=b,
                     kl_coef=w["beta"], kl_mode="loss", clip_eps=w["clip_eps"],
                     reuse_logprobs=not recompute_logprobs, sampler_logprobs=bool(sampler_logprobs),
                     per_layer_update=per_layer_update,
                     pack=bool(long and not share_prompt if pack is None else pack),
                     share_prompt=bool(not (long or pack) if share_prompt is None else share_prompt))
  else:
    minibatch = b // w["minibatches"] if b >= w["minibatches"] else b
    cfg = AlgoConfig(algo="ppo", group_size=1, epochs=w["epochs"], minibatch_size=minibatch,
                     kl_coef=w["kl_coef"], kl_mode="reward", kl_estimator=w["kl_estimator"],
                     lam=w["lam"], gamma=w["gamma"], missing_eos_penalty=w["missing_eos_penalty"],
                     clip_eps=w["clip_eps"], value_clip=w["value_clip"],
                     sampler_logprobs=True if sampler_logprobs is None else sampler_logprobs,
                     per_layer_update=per_layer_update)
  optim = RLOptimConfig(learning_rate=w["learning_rate"], value_learning_rate=w["learning_rate"],
                        warmup_steps=1, grad_clip=w["grad_clip"])
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  sc = SamplingConfig(model=model, max_new_tokens=max_new, eos_id=work.EOS_ID if w["eos"] else -1,
                      pad_id=work.PAD_ID, temperature=w["temperature"], layout=(mesh, rules),
                      prompt_group=group)
  state, ref, experience_fn, update_fn = rl_core(
      cfg, model, optim, 1000, mesh, rules, temperature=sc.temperature,
      ref_key=jax.random.key(2) if algo == "ppo" else None)  # GRPO: the reference = the start policy
  # Initialized as the peers' Hugging Face models are (N(0, 0.02)): same logit scale, same lengths.
  policy = hf_init(state.policy.params, jax.random.key(0))
  ref = hf_init(ref, jax.random.key(2)) if algo == "ppo" else jax.tree.map(jnp.copy, policy)
  state = state.replace(
      policy=state.policy.replace(params=policy),
      value=state.value.replace(params=hf_init(state.value.params, jax.random.key(1)))
      if state.value is not None else None)
  problems = work.problems(4096, seed=0)

  def prompts_of(i: int):
    exs = [problems[(i * prompts + j) % len(problems)] for j in range(prompts) for _ in range(group)]
    ids = np.asarray([work.encode(q) for q, _ in exs], np.int32)
    return ids, np.ones_like(ids), exs

  if algo == "ppo":
    rm_cfg = model  # the reward model: the policy's shape, a scalar head, its own initialization
    rm_params = hf_init(jax.device_put(init_params(RewardModel(rm_cfg), jax.random.key(3)),
                                       replicated(mesh)), jax.random.key(3))

    def score(tokens, resp_mask, exs, rollout):
      toks = jnp.concatenate([rollout.prompt_ids, rollout.response_ids], axis=1)
      mask = jnp.concatenate([rollout.prompt_mask.astype(jnp.int32),
                              rollout.response_mask.astype(jnp.int32)], axis=1)
      return rm_score(rm_params, toks, mask, model_cfg=rm_cfg)
  else:
    def score(tokens, resp_mask, exs, rollout):
      texts = [work.decode(t[m > 0]) for t, m in zip(np.asarray(tokens), np.asarray(resp_mask))]
      return jnp.asarray([work.reward(t, a) for t, (_, a) in zip(texts, exs)], jnp.float32)

  state, runs, compile_s = run_iterations(state, ref, experience_fn, update_fn, cfg, sc, mesh, rules,
                                          prompts_of, score, steps, warmup=warmup, trim=True,
                                          profile=profile)
  # On a shared CPU one peak measurement can land in a load spike: measure again, use the larger.
  again = matmul_peak(peak.get("n"))
  peak = {k: (max(x, again.get(k, 0.0)) if isinstance(x, float) else x) for k, x in peak.items()}

  def flops(r: dict) -> float:
    """Analytic matmul FLOPs of one iteration as it ran: decode steps, and the forwards after
    sampling over the rows x columns they saw (trimmed, packed or shared-prompt rows)."""
    n, slots, full = r["decoded"], r["slots"], p + max_new
    b_seq = r["rows"] * slots  # token slots of each forward after sampling
    if cfg.share_prompt and slots > p - 1 + max_new - 1 + BAND_CHUNK:  # banded (`attention_band`): a
      # response token scores its prompt (p - 1 slots) and its own earlier tokens (max_new / 2 on
      # average): a causal context of 2 (p - 1) + max_new
      slots = 2 * (p - 1) + max_new
    fwd = model.forward_flops_per_token
    # prefill (one row per prompt group; it gives the first token) + decode (every row): a forward
    # after each token but the budget's last; when every row stopped early (EOS), after each
    steps = n if n < max_new else max_new - 1
    out = b // prefill_group(b, sc) * p * fwd(p) + b * steps * fwd(2 * p + n)
    # experience: the policy (old log-probs; not on-policy or from the sampler), the reference
    models = (not cfg.on_policy(b) and not cfg.sampler_logprobs) + cfg.uses_reference
    trained = fwd(slots)
    if algo == "ppo":
      out += b * full * fwd(full, lm_head=False)  # reward model on the untrimmed rollout
      out += b_seq * fwd(slots, lm_head=False)  # critic in make_experience
      trained += fwd(slots, lm_head=False)
    out += models * b_seq * fwd(slots) + cfg.epochs * 3 * b_seq * trained
    return float(out)

  totals = [r["total"] for r in runs]
  sec = statistics.median(totals)
  phases = {k: statistics.median(r[k] for r in runs) for k in PHASES}
  fl = statistics.median(flops(r) for r in runs)
  peak_v = peak_for(peak, "float32")
  split = ", ".join(f"{k} {x:.3f} s ({100 * x / sum(phases.values()):.0f}%)" for k, x in phases.items())
  name = f"{algo}{' long' if long else ''}"
  lines = [f"rl_iteration ({name}) seconds per iteration (median of {steps}): {sec:.3f} s; phase "
           f"medians: {split}",
           f"rl_iteration ({name}): analytic {fl / 1e9:.3g} GFLOP per iteration = "
           f"{fl / sec / 1e9:.3g} GFLOP/s = {100 * fl / sec / peak_v:.1f}% of the matmul peak "
           f"({peak_v / 1e9:.3g} GFLOP/s, the larger of two measurements in this run); response "
           f"tokens per iteration {statistics.median(r['response_tokens'] for r in runs):.0f}, "
           f"longest response {statistics.median(r['decoded'] for r in runs):.0f} tokens, "
           + (f"{'shared-prompt' if cfg.share_prompt else 'packed'} rows "
              f"{statistics.median(r['rows'] for r in runs):.0f} of "
              f"{statistics.median(r['slots'] for r in runs):.0f} slots"
              if cfg.packs else f"trimmed width {statistics.median(r['width'] for r in runs):.0f}"),
           *([f"rl_iteration ({name}): one more iteration traced into {profile} (xprof / "
              f"TensorBoard's profile plugin; not in the timings)"] if profile else []),
           "iterations=" + json.dumps([{k: round(x, 5) if isinstance(x, float) else x
                                        for k, x in r.items()} for r in runs]),
           f"s_per_iter_median={sec:.6f}"]
  config = (f"{algo} d{d_model} L{n_layers} H{n_heads} V{v} {prompts}x{group} P{p}+{max_new}"
            f"{' eos' if w['eos'] else ''} float32{remat_tag(remat)}{' packed' if cfg.pack else ''}{' shared-prompt' if cfg.share_prompt else ''}")
  return result("rl_iteration", config, params=model.num_params() + model.d_model * v,
                tokens_per_s=statistics.median(r["response_tokens"] for r in runs) / sec,
                flops_per_s=fl / sec, peak=peak, dtype="float32", step_s=sec, compile_s=compile_s,
                phases=phases, iterations=runs, lines=lines, s_per_iter_median=sec)


def bench_ppo_update(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192,
                     head_dim: int = 64, d_ff: int | None = None,
                     batch: int = 8, seq: int = 256, prompt: int | None = None, epochs: int = 1,
                     minibatch: int = 0, microbatch: int = 0, steps: int = 2,
                     dtype: str = "float32", devices: str = "one", remat: bool | str = False,
                     variant: str = "jit", **_) -> dict:
  """Response tokens/s and FLOP/s of one jitted PPO update (policy + critic, `epochs` x minibatches,
  compile excluded) on `batch` random sequences of `seq` real tokens, `prompt` (default `seq // 4`)
  of them prompt."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.sampling import Rollout
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  prompt = seq // 4 if prompt is None else prompt
  if not 0 < prompt < seq:
    raise ValueError(f"need 0 < prompt < seq, got prompt={prompt}, seq={seq}")
  n = seq - prompt
  model = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=seq,
                             head_dim=head_dim, d_ff=d_ff, dtype=dtype, remat=remat)
  cfg = AlgoConfig(algo="ppo", group_size=1, epochs=epochs, minibatch_size=minibatch or batch,
                   microbatch_size=microbatch, adaptive_kl=True)
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  state, ref, experience_fn, update_fn = rl_core(cfg, model, RLOptimConfig(warmup_steps=1), 100, mesh,
                                                 rules, variant=variant)

  rng = np.random.default_rng(0)
  rollout = Rollout(prompt_ids=rng.integers(1, vocab, (batch, prompt)).astype(np.int32),
                    prompt_mask=np.ones((batch, prompt), np.int32),
                    response_ids=rng.integers(1, vocab, (batch, n)).astype(np.int32),
                    response_mask=np.ones((batch, n), np.float32),
                    finished=np.ones((batch,), bool))
  rollout = shard_batch(rollout, mesh, rules)
  scores = jnp.asarray(rng.normal(size=batch).astype(np.float32))

  def experience():
    return experience_fn(state.policy.params, ref, state.value.params, rollout, scores, state.kl.value)

  t = time.perf_counter()
  exp, _ = jax.block_until_ready(experience())
  exp_compile_s = time.perf_counter() - t
  exp_sec = statistics.median(time_calls(experience, steps))

  t = time.perf_counter()
  compiled = update_fn.lower(state, exp, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - t
  memory = compiled_memory(compiled)
  state, _ = compiled(state, exp, jax.random.key(3))  # warm up (state donated: rebind every call)
  jax.block_until_ready(state)
  calls = []

  def call():
    nonlocal state
    state, metrics = compiled(state, exp, jax.random.key(4 + len(calls)))
    calls.append(1)
    return metrics

  sec = statistics.median(time_calls(call, steps))
  # On a shared CPU one matmul measurement (~1 s) can land in a load spike while the update runs
  # for tens of seconds: measure the peak again right after and divide by the larger of the two.
  again = matmul_peak(peak.get("n"))
  peak = {k: (max(v, again.get(k, 0.0)) if isinstance(v, float) else v) for k, v in peak.items()}
  cols = seq - 1  # the forwards skip the last token, which predicts nothing (`predicting_inputs`)
  tokens = batch * cols
  fwd_policy = model.forward_flops_per_token(cols) * tokens
  fwd_value = model.forward_flops_per_token(cols, lm_head=False) * tokens
  update_flops = epochs * 3.0 * (fwd_policy + fwd_value)
  peak_v = peak_for(peak, dtype)
  exp_flops = 2 * fwd_policy + fwd_value
  lines = [f"ppo_update: make_experience (policy + reference + critic forwards, GAE) "
           f"{1e3 * exp_sec:.0f} ms, {exp_flops / exp_sec / 1e9:.3g} GFLOP/s = "
           f"{100 * exp_flops / exp_sec / peak_v:.1f}% of the matmul peak (compile {exp_compile_s:.1f} s); "
           f"update + experience together {100 * (update_flops + exp_flops) / (sec + exp_sec) / peak_v:.1f}%",
           f"ppo_update: matmul peak re-measured after the update: "
           f"{again[dtype if dtype in again else 'float32'] / 1e9:.3g} GFLOP/s; ratios use the larger"]
  return result("ppo_update",
                f"{shape_tag(d_model, n_layers, vocab, head_dim, d_ff)} B{batch} T{seq} (P{prompt}+{n}) "
                f"E{epochs} mb{cfg.minibatch_size} {dtype} {variant}" + remat_tag(remat),
                params=2 * model.num_params(), tokens_per_s=batch * n * epochs / sec,
                flops_per_s=update_flops / sec, peak=peak, dtype=dtype, step_s=sec,
                compile_s=compile_s, memory=memory, lines=lines, experience_s=exp_sec)
