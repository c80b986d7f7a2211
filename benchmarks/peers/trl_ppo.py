"""TRL `PPOTrainer`, the old API (trl==0.19.1, requirements-trl019.txt), on the peer work, CPU, float32.

    benchmarks/peers/.venv-trl019/bin/python benchmarks/peers/trl_ppo.py [--long] [--steps=5]

The trainer's own `train()` loop runs `warmup + steps` PPO iterations (64 episodes each); a
`TrainerCallback` marks each iteration's end (`on_step_end`), so an iteration is the wall time
between two of them (everything the loop does: generation, experience, 4 epochs x 4 minibatches,
its metrics, `gc.collect`). Phases: `batch_generation` (sample: HF `generate` of the 64 episodes)
and `accelerator.accumulate` (its first call opens the update) are wrapped with timers, so
experience = end of sampling -> first minibatch (policy, reference, critic and reward-model
forwards, KL rewards, GAE, whitening) and update = first minibatch -> the callback; other = the
rest (data loading, trainer bookkeeping after the callback).

Policy, reference, critic and reward model are four random Llama models of the work's shape, each
from its own torch seed. TRL 0.19's PPO never clips gradients (no `clip_grad_norm_` in its loop).
The default workload has no stop token (`stop_token=None`: TRL leaves the policy's
generation_config.eos_token_id unset), so every episode decodes 16 tokens; `--long` uses
`stop_token="eos"` and 256 tokens, and TRL's `generate` stops when every row has emitted EOS.
"""

from __future__ import annotations

import os
import tempfile
import time

from common import Timer, causal_lm, parser, resolve, sequence_classifier, summary, work


def main():
  args = parser("ppo", __doc__.splitlines()[0]).parse_args()
  w = resolve(args)
  import torch
  import trl.trainer.ppo_trainer as ppo_mod
  from datasets import Dataset
  from transformers import TrainerCallback
  from trl import PPOConfig, PPOTrainer

  torch.set_num_threads(os.cpu_count() or 1)
  tmp = tempfile.mkdtemp(prefix="peer_trl_ppo_")
  tok = work.hf_tokenizer(os.path.join(tmp, "tok"))
  n_iters = w["warmup"] + w["steps"]
  b = w["prompts"] * w["group"]
  probs = work.problems(max(4096, b * n_iters), seed=0)
  data = Dataset.from_dict({"input_ids": [work.encode(q) for q, _ in probs]})
  config = PPOConfig(
      output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=b,
      gradient_accumulation_steps=1, num_mini_batches=w["minibatches"], num_ppo_epochs=w["epochs"],
      total_episodes=b * n_iters, local_rollout_forward_batch_size=b, response_length=w["max_new"],
      stop_token="eos" if w["eos"] else None, missing_eos_penalty=-w["missing_eos_penalty"],
      kl_coef=w["kl_coef"], kl_estimator=w["kl_estimator"], gamma=w["gamma"], lam=w["lam"],
      cliprange=w["clip_eps"], cliprange_value=w["value_clip"], vf_coef=w["vf_coef"],
      whiten_rewards=False, temperature=w["temperature"], learning_rate=w["learning_rate"],
      num_sample_generations=0, use_cpu=True, bf16=False, fp16=False, report_to="none",
      save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, dataloader_num_workers=0)
  trainer = PPOTrainer(args=config, processing_class=tok, model=causal_lm(w, seed=0),
                       ref_model=causal_lm(w, seed=1), reward_model=sequence_classifier(w, seed=3),
                       value_model=sequence_classifier(w, seed=2), train_dataset=data)
  timer = Timer()
  ppo_mod.batch_generation = timer.wrap("sample", ppo_mod.batch_generation)
  accelerate = trainer.accelerator.accumulate
  marks: dict[str, float] = {}

  def accumulate(*a, **k):
    marks.setdefault("update_start", time.perf_counter())
    return accelerate(*a, **k)

  trainer.accelerator.accumulate = accumulate
  gen_end = {}
  sample_fn = ppo_mod.batch_generation

  def sample(*a, **k):
    out = sample_fn(*a, **k)
    gen_end["t"] = time.perf_counter()
    return out

  ppo_mod.batch_generation = sample
  runs: list[dict] = []
  last = {"t": None}

  class StepTimes(TrainerCallback):
    def on_train_begin(self, *_, **__):
      last["t"] = time.perf_counter()

    def on_step_end(self, *_, **__):
      now = time.perf_counter()
      ph = timer.take()
      start = marks.pop("update_start")
      sample_s = ph.get("sample", 0.0)
      total = now - last["t"]
      r = {"sample": sample_s, "experience": start - gen_end["t"], "update": now - start,
           "total": total}
      r["other"] = total - r["sample"] - r["experience"] - r["update"]
      runs.append(r)
      last["t"] = now

  trainer.add_callback(StepTimes())
  trainer.train()
  print(f"trl {__import__('trl').__version__}, transformers {__import__('transformers').__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  summary("trl PPOTrainer", w, runs[w["warmup"]:], ["sample", "experience", "update", "other"])


if __name__ == "__main__":
  main()
