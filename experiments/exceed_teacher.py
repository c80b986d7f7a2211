"""Exceed the teacher: SFT on a systematically flawed teacher, then RL with the math verifier.

    python -m rlhfjax.main --config=experiments/exceed_teacher.py --workdir=/tmp/exceed

The teacher adds 2-digit numbers column by column with a scratchpad but usually (75% of the time)
forgets the carry out of the tens column — the new leading digit ("47 + 68 = 15"); every other
carry it writes correctly. 59% of 2-digit sums have that carry, so the teacher's own held-out
accuracy is ~56%. SFT imitates it (greedy decoding picks the teacher's majority habit and does
worse still); RL with a 0/1 verifier reward on the final answer then amplifies the minority
behaviour it sampled and trains past the teacher.

The algorithm-specific files (`grpo_arith.py`, `rloo_arith.py`, `reinforce_pp_arith.py`,
`best_of_n_arith.py`) change only `rl.*`, so their SFT stage is bit-identical (same seed, same
data): to compare algorithms without re-running SFT, copy a finished workdir, delete its
`checkpoints/rl`, and run another file on the copy (the `sft` stage resumes instantly). One full
run from scratch (data, tokenizer, SFT, RL, evals) is the under-15-minutes-on-2-CPU-cores budget.
"""

try:
  from . import arithmetic
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  arithmetic = import_sibling(__file__, "arithmetic")


def get_config(algo: str = "grpo"):
  c = arithmetic.get_config()
  c.stages = "sft,rl"

  # The flawed teacher: forgets the carry out of the leading (tens) column 75% of the time.
  c.data.flaw = "drop_final_carry"
  c.data.flaw_prob = 0.75
  c.data.num_train = 10_000
  c.data.num_test = 1_000

  # A smaller policy than the SFT demo's so SFT + RL fit the 2-core budget.
  c.model.d_model = 96
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 24
  c.model.d_ff = 256

  c.sft.steps = 400  # ~100% on the problems the teacher gets right; its habit on the rest
  c.sft.batch_size = 32
  c.sft.warmup_steps = 20
  c.sft.checkpoint_every = 100
  c.sft.eval_examples = 256

  c.rl.algo = algo
  c.rl_loop.iterations = 30
  c.rl_loop.prompts_per_iter = 16
  c.rl.group_size = 8
  c.rl.minibatch_size = 64
  c.rl.epochs = 1
  c.rl_optim.learning_rate = 1e-4  # 3e-4 was unstable (sequence KL > 2 nats within 6 iterations)
  c.rl_optim.warmup_steps = 2
  c.rl.kl_coef = 0.01  # small: the point is to move away from the teacher's habit
  c.rl_sampling.temperature = 1.0
  c.rl_reward = "math:1.0"
  c.rl_loop.eval_every = 10
  c.rl_loop.eval_examples = 256
  c.rl_loop.eval_samples = 4
  c.rl_loop.checkpoint_every = 10

  c.eval.batch_size = 128
  return c
