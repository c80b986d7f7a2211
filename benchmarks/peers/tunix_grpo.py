"""Tunix `GRPOLearner` (google-tunix==0.1.7, requirements-tunix.txt; JAX) on the peer work, CPU, float32.

    benchmarks/peers/.venv-tunix/bin/python benchmarks/peers/tunix_grpo.py [--long] [--steps=5]

Tunix's own Llama 3 (`tunix.models.llama3`, random weights from `create_dummy_model`: the work's
shape, untied head) as actor and reference (the same initial weights, as rlhfjax's GRPO reference is
the start policy), the vanilla rollout engine, one (1, 1) mesh for every role, the shared HF
tokenizer through Tunix's adapter, `GRPOLearner.train` over batches of 8 prompts x 8 generations,
mu = 1, beta 0.04. The learner's `_generate_and_compute_advantage` (sample, reward, reference and
old log-probs, advantages) and the cluster's `generate` are wrapped with timers; an iteration is
the interval between two starts of `_generate_and_compute_advantage` (so the learner's update of
the previous batch is inside it), update = that interval minus the rollout's own time.
"""

from __future__ import annotations

import os
import tempfile
import time

from common import Timer, parser, resolve, summary, work


def main():
  args = parser("grpo", __doc__.splitlines()[0]).parse_args()
  w = resolve(args)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from tunix.models.dummy_model_creator import create_dummy_model
  from tunix.models.llama3 import model as llama3
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
  from tunix.rl.rollout import base_rollout

  tmp = tempfile.mkdtemp(prefix="peer_tunix_grpo_")
  tok = work.hf_tokenizer(os.path.join(tmp, "tok"))
  cfg = llama3.ModelConfig(num_layers=w["n_layers"], vocab_size=len(work.VOCAB), embed_dim=w["d_model"],
                           hidden_dim=w["d_ff"], num_heads=w["n_heads"], head_dim=w["head_dim"],
                           num_kv_heads=w["n_heads"], rope_theta=int(w["rope_theta"]),
                           norm_eps=w["rms_norm_eps"], weight_tying=False)
  # Auto axes: jax.make_mesh's default (Explicit) rejects Tunix's embedding gather
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  actor = create_dummy_model(llama3.Llama3, cfg, mesh=mesh, dtype=jnp.float32, random_seed=0)
  reference = create_dummy_model(llama3.Llama3, cfg, mesh=mesh, dtype=jnp.float32, random_seed=0)
  n_iters = w["warmup"] + w["steps"] + 1  # +1: the last timed interval ends at the next rollout
  b = w["prompts"] * w["group"]
  roles = rl_cluster_lib.Role
  eos = [work.EOS_ID] if w["eos"] else [len(work.VOCAB) + 7]  # an id never sampled: EOS off
  rollout = base_rollout.RolloutConfig(max_tokens_to_generate=w["max_new"],
                                       max_prompt_length=work.PROMPT_LEN,
                                       kv_cache_size=work.PROMPT_LEN + w["max_new"] + 8,
                                       temperature=w["temperature"], top_p=1.0, top_k=None,
                                       eos_tokens=eos, data_type=jnp.float32)
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.chain(optax.clip_by_global_norm(w["grad_clip"]),
                                  optax.adamw(w["learning_rate"])),
      eval_every_n_steps=10_000, max_steps=n_iters, mini_batch_size=w["prompts"],
      gradient_accumulation_steps=None)
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=tok,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
          rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
          rollout_config=rollout))

  def sum_reward(prompts, completions, answer, **_):
    return [work.reward(c, a) for c, a in zip(completions, answer)]

  learner = GRPOLearner(rl_cluster=cluster, reward_fns=sum_reward,
                        algo_config=GRPOConfig(num_generations=w["group"], num_iterations=w["epochs"],
                                               beta=w["beta"], epsilon=w["clip_eps"]))
  timer = Timer()
  starts: list[float] = []
  rollouts: list[dict] = []
  gen = learner._generate_and_compute_advantage

  def timed_rollout(*a, **k):
    starts.append(time.perf_counter())
    out = timer.wrap("rollout", gen)(*a, **k)
    rollouts.append(timer.take())
    return out

  learner._generate_and_compute_advantage = timed_rollout
  cluster.generate = _wrap_into(timer, "sample", cluster.generate)
  probs = work.problems(max(4096, w["prompts"] * n_iters), seed=0)
  # numpy leaves: the learner maps np.repeat over the batch's pytree ([B] -> [B * G])
  batches = [{"prompts": np.array([q for q, _ in probs[i * w["prompts"]:(i + 1) * w["prompts"]]]),
              "answer": np.array([a for _, a in probs[i * w["prompts"]:(i + 1) * w["prompts"]]])}
             for i in range(n_iters + 1)]
  learner.train(batches)
  runs = []
  for i in range(len(starts) - 1):
    total = starts[i + 1] - starts[i]
    ph = rollouts[i]
    runs.append({"sample": ph.get("sample", 0.0), "experience": ph["rollout"] - ph.get("sample", 0.0),
                 "update": total - ph["rollout"], "total": total})
  print(f"tunix (google-tunix 0.1.7), jax {jax.__version__}, {jax.devices()[0].platform}; "
        f"{len(starts)} rollouts of {b} completions")
  summary("tunix GRPOLearner", w, runs[w["warmup"]:], ["sample", "experience", "update"])


def _wrap_into(timer: Timer, name: str, fn):
  def timed(*a, **k):
    t = time.perf_counter()
    try:
      return fn(*a, **k)
    finally:
      timer.cur[name] = timer.cur.get(name, 0.0) + time.perf_counter() - t
  return timed


if __name__ == "__main__":
  main()
