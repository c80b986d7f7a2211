"""Bring your own model: GRPO on a Hugging Face checkpoint with its own tokenizer and chat template,
on a JSONL file of word problems, rewarded by the math verifier; then export.

    python -m rlhfjax.main --config=hf_grpo --workdir=/tmp/hf_grpo --config.model.hf_path=DIR
    python -m rlhfjax.export --workdir=/tmp/hf_grpo --stage=rl --out=/tmp/hf_grpo/export

DIR holds config.json + *.safetensors + tokenizer.json (+ tokenizer_config.json with the chat
template): Llama 3.x, Qwen2/2.5, Qwen3 or Gemma 3 text. The data default to the shipped GSM8K-format
sample (`rlhfjax/data/gsm8k_sample.jsonl`); point `data.train_path` at your own file and map its
keys with `data.fields`. `--config.stages=sft,rl` first imitates the file's worked answers; the
default `rl` starts from the checkpoint itself. Rewards: registered names or `pkg.mod:fn` import
paths with weights, e.g. `--config.rl_reward="math:1.0,mypkg.rewards:brevity:0.2"`.
"""

try:
  from . import arithmetic
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  arithmetic = import_sibling(__file__, "arithmetic")


def get_config():
  from rlhfjax.data.files import sample_path
  c = arithmetic.get_config()
  c.stages = "rl"
  c.model.hf_path = ""  # the checkpoint directory (required; --config.model.hf_path=DIR)
  c.model.dtype = "float32"  # "bfloat16" on accelerators

  c.data.source = "file"
  c.data.train_path = sample_path()
  c.data.test_fraction = 0.2
  c.data.fields = {"prompt": "question", "answer": "answer"}  # GSM8K keys; "#### N" answers parsed
  c.data.max_prompt_len = 192
  c.data.max_response_len = 128

  c.sft.steps = 50
  c.sft.batch_size = 8
  c.sft.learning_rate = 1e-5
  c.sft.warmup_steps = 5
  c.sft.eval_examples = 0

  c.rl.algo = "grpo"
  c.rl.group_size = 4
  c.rl.minibatch_size = 16
  c.rl.kl_coef = 0.01
  c.rl_optim.learning_rate = 1e-6
  c.rl_optim.warmup_steps = 2
  c.rl_loop.iterations = 20
  c.rl_loop.prompts_per_iter = 4
  c.rl_loop.eval_every = 0
  c.rl_loop.eval_examples = 8
  c.rl_loop.eval_samples = 2
  c.rl_loop.checkpoint_every = 10
  c.rl_reward = "math:1.0"
  c.eval.batch_size = 8
  return c
