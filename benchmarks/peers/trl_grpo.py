"""TRL `GRPOTrainer` (trl==1.16.0, requirements-trl.txt) on the peer work, CPU, float32.

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_grpo.py [--long] [--steps=5]

The trainer's own `train()` loop runs `warmup + steps` optimizer steps; a `TrainerCallback` times
each step (on_step_begin -> on_step_end) and the trainer's `_generate` (sample: tokenize, HF
`generate`, decode), `_calculate_rewards` (score) and `_generate_and_score_completions` (the rest of
it is experience: reference log-probs, advantages) are wrapped with timers; update = the step minus
all that (policy forward + backward + AdamW). With beta 0.04 TRL loads the reference from the same
checkpoint as the policy (as rlhfjax's GRPO reference is the start policy); mu = 1, so TRL uses the
policy's own detached log-probs as the old ones (no extra forward). The default workload suppresses
EOS (`min_new_tokens` = the budget) so every row decodes all 16 tokens, as rlhfjax's eos_id=-1 does.
"""

from __future__ import annotations

import os
import tempfile
import time

from common import Timer, causal_lm, parser, resolve, summary, work


def main():
  args = parser("grpo", __doc__.splitlines()[0]).parse_args()
  w = resolve(args)
  import torch
  from datasets import Dataset
  from transformers import TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  torch.set_num_threads(os.cpu_count() or 1)
  tmp = tempfile.mkdtemp(prefix="peer_trl_grpo_")
  tok = work.hf_tokenizer(os.path.join(tmp, "model"))
  causal_lm(w, seed=0).save_pretrained(os.path.join(tmp, "model"))
  n_steps = w["warmup"] + w["steps"]
  probs = work.problems(max(4096, w["prompts"] * n_steps), seed=0)
  data = Dataset.from_dict({"prompt": [q for q, _ in probs], "answer": [a for _, a in probs]})

  def sum_reward(completions, answer, **_):
    return [work.reward(c, a) for c, a in zip(completions, answer)]

  b = w["prompts"] * w["group"]
  gen_kwargs = None if w["eos"] else {"min_new_tokens": w["max_new"]}
  config = GRPOConfig(
      output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=b, gradient_accumulation_steps=1,
      num_generations=w["group"], max_completion_length=w["max_new"], beta=w["beta"],
      num_iterations=w["epochs"], epsilon=w["clip_eps"], temperature=w["temperature"],
      learning_rate=w["learning_rate"], max_grad_norm=w["grad_clip"], max_steps=n_steps,
      generation_kwargs=gen_kwargs, use_cpu=True, bf16=False, fp16=False, report_to="none",
      save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, shuffle_dataset=False,
      dataloader_num_workers=0)
  trainer = GRPOTrainer(model=os.path.join(tmp, "model"), reward_funcs=sum_reward, args=config,
                        train_dataset=data, processing_class=tok)
  timer = Timer()
  trainer._generate = timer.wrap("sample", trainer._generate)
  trainer._calculate_rewards = timer.wrap("score", trainer._calculate_rewards)
  trainer._generate_and_score_completions = timer.wrap("rollout", trainer._generate_and_score_completions)
  runs: list[dict] = []

  class StepTimes(TrainerCallback):
    def on_step_begin(self, *_, **__):
      timer.take()
      self.t = time.perf_counter()

    def on_step_end(self, *_, **__):
      total = time.perf_counter() - self.t
      ph = timer.take()
      sample, score = ph.get("sample", 0.0), ph.get("score", 0.0)
      rollout = ph.get("rollout", 0.0)
      runs.append({"sample": sample, "score": score, "experience": rollout - sample - score,
                   "update": total - rollout, "total": total})

  trainer.add_callback(StepTimes())
  trainer.train()
  lengths = trainer._metrics["train"].get("completions/mean_length", [])
  print(f"trl {__import__('trl').__version__}, transformers {__import__('transformers').__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); mean completion length "
        f"per step: {[round(x, 1) for x in lengths]}")
  summary("trl GRPOTrainer", w, runs[w["warmup"]:], ["sample", "score", "experience", "update"])


if __name__ == "__main__":
  main()
