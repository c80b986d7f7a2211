"""Thinking emerges: RL rewarded only on the final answer makes the policy choose to think.

    python -m rlhfjax.main --config=experiments/thinking.py --workdir=/tmp/thinking
    python -m rlhfjax.main --config=experiments/thinking.py:length --workdir=/tmp/thinking_len

2-digit x 2-digit multiplication ("What is 47 * 23?"). The teacher is always right, but writes a
`<thinking>` scratchpad (partial products, then their sum) in only half of its demonstrations and
answers directly in the other half, so the SFT policy thinks about half of the time when it samples.
At this model size the direct answer is usually wrong and the worked one usually right, so RL
rewarded only on the final answer's correctness (no format reward, no length term) raises the
thinking rate: spreading the computation over tokens earns more reward. The iteration metrics
`think_frac_thinking`, `think_mean_thinking_words`, `think_accuracy_thinking` and
`think_accuracy_direct` tell the story; `accuracy_greedy` and `greedy_think_frac_well_formed` at each eval.

The control (`:length`) adds a per-word cost (`length` reward, 0.2 per word: the scratchpad's five
extra words cost 1.0, more than the accuracy thinking gains), so thinking costs more than it earns
and the thinking rate falls.
Both runs share the SFT stage bit for bit (same seed, same data): copy a finished workdir, delete
`checkpoints/rl`, and run the other variant on the copy.
"""

try:
  from . import arithmetic
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  arithmetic = import_sibling(__file__, "arithmetic")


def get_config(variant: str = "correctness"):
  if variant not in ("correctness", "length"):
    raise ValueError(f"variant must be 'correctness' or 'length', got {variant!r}")
  c = arithmetic.get_config()
  c.stages = "sft,rl"

  c.data.ops = "*"
  c.data.min_digits = c.data.max_digits = 2
  c.data.thinking = True
  c.data.thinking_prob = 0.5  # half the demonstrations think, half answer directly; all correct
  c.data.num_train = 20_000
  c.data.num_test = 1_000
  c.data.max_prompt_len = 16
  c.data.max_response_len = 56  # "<thinking> 47*3=141. 47*20=940. 141+940=1081. </thinking> The answer is 1081."

  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384

  c.sft.steps = 1200
  c.sft.batch_size = 64
  c.sft.warmup_steps = 50
  c.sft.checkpoint_every = 200
  c.sft.eval_examples = 256

  c.rl.algo = "grpo"
  c.rl_loop.iterations = 40
  c.rl_loop.prompts_per_iter = 16
  c.rl.group_size = 8
  c.rl.minibatch_size = 64
  c.rl_optim.learning_rate = 1e-4
  c.rl_optim.warmup_steps = 2
  c.rl.kl_coef = 0.01
  c.rl_sampling.temperature = 1.0
  c.rl_reward = "math:1.0" if variant == "correctness" else "math:1.0,length:0.2"
  c.rl_loop.eval_every = 10
  c.rl_loop.eval_examples = 256
  c.rl_loop.eval_samples = 4
  c.rl_loop.checkpoint_every = 10

  c.eval.batch_size = 128
  return c
