"""Simulated human preferences: SFT on arithmetic, then a reward model from 5,000 noisy comparisons.

The teacher is chatty (filler sentences, repeated answers) and SFT copies it. The labeler
(rlhfjax/data/labeler.py) samples responses from the SFT policy, varies some (repetition, dropped
scratchpads, filler) and labels pairs or K-way rankings with Bradley–Terry noise around a hidden gold
preference (correct + shows work − repetition − padding).

    python -m rlhfjax.main --config=experiments/preference.py --workdir=/tmp/pref
    python -m rlhfjax.main --config=experiments/preference.py --workdir=/tmp/pref4 --config.rm.format=rankings
"""

import ml_collections

try:
  from . import arithmetic
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  arithmetic = import_sibling(__file__, "arithmetic")


def rm_config() -> ml_collections.ConfigDict:
  rm = ml_collections.ConfigDict()
  rm.format = "pairs"  # comparison format: "pairs" or "rankings" (K-way, best to worst)
  rm.ranking_size = 4  # K of K-way rankings (InstructGPT used 4-9)
  rm.pool = "last"  # per-token rewards -> score: "last" token, "sum" or "mean" over real tokens
  rm.train_file = ""  # .jsonl / .parquet of human comparisons; "" = ask the simulated labeler
  rm.test_file = ""  # held-out .jsonl / .parquet of comparisons (required with train_file)
  rm.file_keys = ""  # the files' keys, e.g. "prompt=question,chosen=better,rejected=worse" ("" = ours)
  rm.epochs = 2.0  # passes over the comparisons when steps == 0 (InstructGPT: 1 at their data size)
  rm.steps = 0  # optimizer updates; 0 = epochs * records / batch_size
  rm.batch_size = 32  # comparisons (pairs or rankings) per update
  rm.learning_rate = 1e-3  # peak AdamW learning rate
  rm.warmup_steps = 10  # linear warmup steps
  rm.min_lr_ratio = 0.1  # cosine floor as a fraction of the peak
  rm.weight_decay = 0.0  # decoupled weight decay on matrices
  rm.grad_clip = 1.0  # global-norm clip (0 = off)
  rm.margin_coef = 0.0  # loss margin = margin_coef * record margin (Llama 2); 0 = plain Bradley–Terry
  rm.center_coef = 0.0  # reward-centering term coef*(r_c + r_r)^2 (Eisenstein et al. 2023: 0.01)
  rm.ensemble_size = 1  # reward models trained together with vmap (> 1 = ensemble)
  rm.bootstrap = False  # ensemble members train on Poisson(1)-reweighted batches
  rm.uncertainty_coef = 1.0  # lambda in mean - lambda*std when RL scores with an ensemble
  rm.norm_samples = 512  # reference (SFT) policy samples used to normalize to mean 0 / std 1
  rm.eval_batch_size = 128  # responses per scoring call in evaluation
  rm.log_every = 20  # metrics every N steps
  rm.eval_every = 0  # held-out eval every N steps (0 = before and after only)
  rm.checkpoint_every = 100  # save every N steps (the normalized final state is always saved)
  rm.keep_checkpoints = 2  # checkpoints kept
  return rm


def labeler_config() -> ml_collections.ConfigDict:
  lab = ml_collections.ConfigDict()
  lab.temperature = 0.5  # Bradley–Terry noise: P(A > B) = sigmoid((gold(A) - gold(B)) / temperature)
  lab.label_budget = 5000  # train comparisons; one K-way ranking costs K(K-1)/2 of them
  lab.test_comparisons = 1000  # held-out pairs (always pairs so formats compare fairly)
  lab.policy_samples = 3  # SFT-policy samples per prompt in the response pool
  lab.perturbations = 1  # programmatic variants per prompt (edits drawn from perturbation_kinds)
  # edits a variant draws 1-2 of: wrong_answer | repeat | drop_thinking | filler | no_answer. The default leaves
  # out wrong_answer (final answer changed, scratchpad kept): this reward model cannot check
  # arithmetic (README: ~55% on pairs that differ only in correctness), so right-vs-wrong comes from
  # the policy's own mistakes; add it back with --config.labeler.perturbation_kinds=...
  lab.perturbation_kinds = "repeat,drop_thinking,filler,no_answer"
  lab.sample_temperature = 1.0  # temperature of the policy samples (and the normalization sample)
  lab.sample_batch_size = 256  # prompts per sampling call
  return lab


def get_config():
  c = arithmetic.get_config()
  c.unlock()
  c.stages = "sft,rm"  # SFT, then labels from the simulated human, then the reward model
  # A chatty teacher: most demonstrations pad the answer with filler sentences and/or say it twice
  # (rlhfjax/data/arithmetic.py). SFT copies the habit; the simulated human dislikes it.
  c.data.chatter = 0.8
  c.data.repeat = 0.6
  c.data.max_response_len = 64  # scratchpad + answer + up to 3 filler sentences and a repeat
  c.tokenizer.vocab_size = 128  # whole-word pieces for the filler
  c.sft.steps = 500
  # A narrower, shallower model than arithmetic.py's (~150k vs ~790k trunk parameters) so SFT,
  # 12k policy samples for the labeler and the reward model all fit in ~10 CPU minutes.
  c.model.d_model = 64
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 16
  c.model.d_ff = 192
  c.rm = rm_config()
  c.labeler = labeler_config()
  c.lock()
  return c
