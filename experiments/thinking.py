"""Thinking emerges: RL rewarded only on the final answer makes the policy choose to think.

    python -m rlhfjax.main --config=experiments/thinking.py --workdir=/tmp/thinking
    python -m rlhfjax.main --config=experiments/thinking.py:length --workdir=/tmp/thinking_len

2-digit x 2-digit multiplication ("What is 47 * 23?"). The teacher is always right, but writes a
`<thinking>` scratchpad (partial products, then their sum) in only 40 % of its demonstrations and
answers directly in the rest, so the SFT policy thinks about half of the time when it samples.
At this model size the direct answer is usually wrong and the worked one usually right, so RL
rewarded only on the final answer's correctness (no format reward, no length term) raises the
thinking rate: spreading the computation over tokens earns more reward. The iteration metrics
`think_frac_thinking`, `think_mean_thinking_words`, `think_accuracy_thinking` and
`think_accuracy_direct` tell the story; at each held-out eval `accuracy_sampled`,
`sampled_think_frac_thinking` (the share of held-out samples that think), `accuracy_greedy`, and
every held-out completion in `samples.jsonl`.

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
  c.data.thinking_prob = 0.45  # 45% of the demonstrations think, the rest answer directly; all correct
  # (the SFT policy then samples a scratchpad about half of the time: it over-uses the longer form)
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

  c.sft.steps = 1400
  c.sft.batch_size = 32
  c.sft.warmup_steps = 50
  c.sft.checkpoint_every = 200
  c.sft.eval_examples = 256

  c.rl.algo = "grpo"
  c.rl_loop.iterations = 60
  c.rl_loop.prompts_per_iter = 16
  c.rl.group_size = 8
  c.rl.minibatch_size = 64
  c.rl_optim.learning_rate = 1e-4
  c.rl_optim.warmup_steps = 2
  c.rl.kl_coef = 0.01
  c.rl_sampling.temperature = 1.0
  c.rl_reward = "math:1.0" if variant == "correctness" else "math:1.0,length:0.2"
  c.rl_loop.eval_every = 20
  c.rl_loop.eval_examples = 256
  c.rl_loop.eval_samples = 4
  c.rl_loop.checkpoint_every = 10

  c.eval.batch_size = 128
  return c


def plot(workdir: str, control_workdir: str, out: str) -> None:
  """The README figure: the share of samples that think per iteration, and the held-out sampled
  accuracy and thinking share at each eval, of the correctness run and the length-cost control."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from rlhfjax.metrics import read_metrics

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for w, label in ((workdir, "reward = correctness"), (control_workdir, "correctness - 0.2/word")):
    train, evals = read_metrics(w, "rl"), read_metrics(w, "rl_eval")
    axes[0].plot([r["step"] for r in train], [r["think_frac_thinking"] for r in train], label=label)
    for ax, key in ((axes[1], "accuracy_sampled"), (axes[2], "sampled_think_frac_thinking")):
      ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
  for ax, title in zip(axes, ("training samples that think", "held-out accuracy (sampled, T=1)",
                              "held-out samples that think")):
    ax.set(xlabel="GRPO iteration", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=100)


if __name__ == "__main__":  # python experiments/thinking.py <workdir> <control workdir> <figure.png>
  import sys
  plot(*sys.argv[1:4])
