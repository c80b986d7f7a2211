"""A tiny `sft,rm,ppo` config for the PPO end-to-end tests (seconds per stage on a CPU)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import ppo_preference  # noqa: E402


def get_config():
  c = ppo_preference.get_config()
  c.unlock()
  for k, v in dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64).items():
    c.model[k] = v
  c.data.num_train = 400
  c.data.num_test = 40
  c.eval.batch_size = 8
  c.sft.update(steps=24, batch_size=8, warmup_steps=2, log_every=8, checkpoint_every=24,
               eval_examples=0)
  c.labeler.update(label_budget=32, test_comparisons=16, sample_batch_size=64)
  c.rm.update(batch_size=8, norm_samples=16, eval_batch_size=32, log_every=2, checkpoint_every=100)
  c.rl.update(minibatch_size=4, epochs=2)
  c.rl_optim.update(warmup_steps=1)
  c.rl_loop.update(iterations=6, prompts_per_iter=8, eval_every=0, eval_examples=0, checkpoint_every=2,
                   log_every=1)
  c.ppo.update(gold_eval_prompts=8, samples_table=4)
  c.lock()
  return c
