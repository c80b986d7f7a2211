"""The work of `python -m rlhfjax.bench rl_iteration` and of the peer scripts in benchmarks/peers/.

One definition for both sides: the peer scripts run in their own virtual environments (TRL, Tunix)
without rlhfjax installed and load this file by path, so it imports nothing outside the standard
library at module level (`hf_tokenizer` imports `tokenizers` / `transformers` inside).

The task is 3-digit addition, `"123+456="` -> `"579"`. The tokenizer is the character-split BPE a
Hugging Face trainer sees for such strings: no merge can ever apply, so its vocabulary is the four
special tokens then the 12 characters, 16 tokens; prompts are 8 tokens (no BOS), EOS is id 3.
"""

from __future__ import annotations

import random

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
CHARS = "+0123456789="
VOCAB = SPECIAL + tuple(CHARS)  # id = index
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PROMPT_LEN = 8  # "ddd+ddd="

# A Llama-like trunk: RMSNorm, RoPE, SwiGLU, no GQA, untied LM head, float32 (4.2 M parameters).
MODEL = dict(vocab_size=len(VOCAB), d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=1024,
             rope_theta=10_000.0, rms_norm_eps=1e-6, tie_embeddings=False, dtype="float32")

# GRPO: 8 prompts x 8 samples x 16 new tokens, KL (beta 0.04) in the loss, mu = 1: one AdamW step
# on the whole batch per iteration.
GRPO = dict(prompts=8, group=8, max_new=16, beta=0.04, epochs=1, minibatches=1, clip_eps=0.2,
            temperature=1.0, learning_rate=1e-6, grad_clip=1.0)
# PPO: 64 episodes x 16 tokens; separate policy, differently-initialized reference, critic and
# reward model; k1 KL 0.05 in the reward; GAE lambda 0.95 (gamma 1); responses without EOS score -1
# extra; 4 epochs x 4 minibatches of 16; no gradient clipping.
PPO = dict(prompts=64, group=1, max_new=16, kl_coef=0.05, kl_estimator="k1", lam=0.95, gamma=1.0,
           missing_eos_penalty=-1.0, epochs=4, minibatches=4, minibatch=16, clip_eps=0.2,
           value_clip=0.2, vf_coef=0.1, temperature=1.0, learning_rate=3e-6, grad_clip=0.0)
# The second workload: a 256-token response budget with EOS on (random models end early; the
# response axis is trimmed to the longest response before the forwards).
LONG = dict(max_new=256, eos=True)
DEFAULT_EOS = False  # the default workload decodes every one of its max_new tokens

WORK = {"grpo": GRPO, "ppo": PPO}


def workload(algo: str, long: bool = False) -> dict:
  """The flags of one workload: model shape plus the algorithm's batch, budget and EOS."""
  if algo not in WORK:
    raise ValueError(f"algo must be one of {sorted(WORK)}, got {algo!r}")
  w = {**MODEL, **WORK[algo], "algo": algo, "eos": DEFAULT_EOS, "long": bool(long)}
  if long:
    w.update(max_new=LONG["max_new"], eos=LONG["eos"])
  return w


def num_params(d_model: int = MODEL["d_model"], n_layers: int = MODEL["n_layers"],
               d_ff: int = MODEL["d_ff"], vocab: int = len(VOCAB)) -> int:
  """Parameters of the policy (no GQA: q, k, v, o all d_model x d_model; embedding + untied head)."""
  per_layer = 4 * d_model * d_model + 3 * d_model * d_ff + 2 * d_model
  return n_layers * per_layer + d_model + 2 * vocab * d_model


def problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """`n` (prompt, answer) pairs: `("123+456=", "579")`, operands uniform in [100, 999]."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    out.append((f"{a}+{b}=", str(a + b)))
  return out


def reward(completion: str, answer: str) -> float:
  """1.0 if the completion starts with the right sum, else 0.0."""
  return 1.0 if completion.startswith(answer) else 0.0


_ID = {t: i for i, t in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
  """Character ids (what the Hugging Face tokenizer below gives, no BOS / EOS added)."""
  return [_ID.get(c, UNK_ID) for c in text]


def decode(ids, stop_at_eos: bool = True) -> str:
  """Text of ids, special tokens skipped; with `stop_at_eos`, only what precedes the first EOS."""
  out = []
  for i in ids:
    i = int(i)
    if stop_at_eos and i == EOS_ID:
      break
    if i >= len(SPECIAL):
      out.append(VOCAB[i])
  return "".join(out)


def hf_tokenizer(path: str | None = None):
  """The Hugging Face `PreTrainedTokenizerFast` the peers use (built with `tokenizers`: a BPE with
  this vocabulary and no merges, split into characters), saved to `path` when given."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(vocab=dict(_ID), merges=[], unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.decoder = decoders.Fuse()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>", padding_side="left")
  if path:
    hf.save_pretrained(path)
  return hf
