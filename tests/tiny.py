"""A tiny arithmetic config shared by the end-to-end tests (seconds per stage on a CPU)."""

import sys

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from experiments import arithmetic  # noqa: E402


def get_config():
  c = arithmetic.get_config()
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.model.head_dim = 16
  c.model.d_ff = 64
  c.data.num_train = 400
  c.data.num_test = 40
  c.sft.steps = 24
  c.sft.batch_size = 8
  c.sft.warmup_steps = 2
  c.sft.log_every = 4
  c.sft.checkpoint_every = 6
  c.sft.eval_examples = 8
  c.eval.batch_size = 8
  return c
