"""Practice on code: SFT on a teacher with one systematic bug class, then RL with the sandbox verifier.

    python -m rlhfjax.main --config=experiments/code.py --workdir=/tmp/code

The tasks are one-line Python functions (`rlhfjax.data.code_tasks`): a one-line spec and two
input/output examples in the prompt, hidden asserts for scoring. The teacher confuses an inclusive
bound with an exclusive one 75% of the time (`>` for `>=`, `range(1, n)` for `range(1, n + 1)`),
so SFT imitates the off-by-one habit; RL rewarded by the fraction of hidden tests that pass in the
sandbox (`code` reward) amplifies the minority right behaviour past the teacher, as the arithmetic
chapter does with carries. Scoring runs the sandboxes in parallel over the machine's cores (the
`time_score_s` metric; completions/s = rollout size / time_score_s).
"""

try:
  from . import arithmetic
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  arithmetic = import_sibling(__file__, "arithmetic")


def get_config():
  c = arithmetic.get_config()
  c.stages = "sft,rl"
  c.tokenizer.vocab_size = 320  # words and operators merge into pieces; digits stay single tokens

  c.data.source = "code"
  c.data.flaw_prob = 0.75  # the teacher's off-by-one rate
  c.data.num_train = 10_000
  c.data.num_test = 500
  c.data.max_prompt_len = 128  # the longest prompts are ~105 tokens with the template
  c.data.max_response_len = 32

  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384

  c.sft.steps = 400
  c.sft.batch_size = 32
  c.sft.warmup_steps = 20
  c.sft.checkpoint_every = 100
  c.sft.eval_examples = 128

  c.rl.algo = "grpo"
  c.rl_loop.iterations = 60
  c.rl_loop.prompts_per_iter = 16
  c.rl.group_size = 8
  c.rl.minibatch_size = 64
  c.rl_optim.learning_rate = 1e-4
  c.rl_optim.warmup_steps = 2
  c.rl.kl_coef = 0.01
  c.rl_reward = "code:1.0"
  c.rl_loop.eval_every = 20
  c.rl_loop.eval_examples = 128
  c.rl_loop.eval_samples = 0
  c.rl_loop.checkpoint_every = 10

  c.eval.batch_size = 128
  return c
