"""The `ppo` stage: RLHF against the learned reward model, with a KL-controlled frozen reference.

Runs after `sft` and `rm` (`config.stages = "sft,rm,ppo"`), or alone on a workdir where both
finished. The policy and the frozen reference start from the SFT parameters; the separate critic
from the RM's trunk (`ppo.value_init = "rm"`, lm-human-preferences) or the SFT one (`"sft"`) with a
zero value head (`rl.shared_trunk = True`: one trunk, LM + value heads, `ppo.value_init` unused).
The scorer is the RM on device; an ensemble (`rm.ensemble_size > 1`) scores `mean − λ·std`
(λ = `rm.uncertainty_coef`). Any `rl.algo` works (critic-free ones ignore the critic).

The iteration is `RLStage`'s; this stage adds the simulated human's gold score of every rollout
(`gold_reward_mean`, beside the proxy `reward_mean`), a held-out gold/proxy eval (`gold_mean`,
`gold_std`, `proxy_mean`) with a samples table, and `plots/ppo_curves.png` (proxy, gold, KL).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from rlhfjax.config import get_field, to_dataclass
from rlhfjax.train.rl_stage import RLStage, RolloutConfig, rl_configs
from rlhfjax.train.stage import Run, register_stage, stage_params

log = logging.getLogger("rlhfjax")


@dataclasses.dataclass(frozen=True)
class PPOStageConfig:
  """Options of the `ppo` stage beyond the `rl*` sections."""

  value_init: str = "rm"  # critic trunk from the reward model ("rm") or the SFT policy ("sft")
  gold_eval_prompts: int = 256  # held-out prompts sampled for the gold/proxy eval (0 = off)
  samples_table: int = 16  # held-out (prompt, response, gold, proxy) rows written before and after


def gold_eval(run: Run, model, rm_params, sampling: RolloutConfig, stage_cfg: PPOStageConfig, *,
              ensemble: bool, uncertainty_coef: float, pool: str = "last", extra=None):
  """`extra_eval(params) -> dict`: one sample per held-out prompt at the RL temperature, scored by
  the simulated human (gold) and the reward model (proxy; none if `rm_params` is None), plus
  `extra(params, tokens, mask) -> dict` of the samples if given. Keeps the last rows for a table."""
  from rlhfjax.data import encode_sequences
  from rlhfjax.data.labeler import gold_scores
  from rlhfjax.rewards.base import prompt_text
  from rlhfjax.rewards.scorers import score_batched
  from rlhfjax.sampling.completions import generate_completions
  d = run.config.data
  n = min(stage_cfg.gold_eval_prompts, len(run.test_examples))
  exs = [run.test_examples[i] for i in range(n)]
  prompts = [e["prompt"] for e in exs]
  answers = [e.get("answer") for e in exs]  # a user file of prompts may have none
  rng = jax.random.key(run.seed + 505)  # the same prompts and sampling noise every eval
  tables: list = []

  def evaluate(params) -> dict:
    if n == 0:
      return {}
    texts = generate_completions(params, model, run.tokenizer, prompts,
                                 max_prompt_len=d.max_prompt_len,
                                 max_new_tokens=sampling.max_new_tokens or d.max_response_len,
                                 batch_size=run.config.eval.batch_size, rng=rng,
                                 temperature=sampling.temperature)
    gold = gold_scores([prompt_text(p) for p in prompts], texts, answers)
    tokens, mask = encode_sequences(run.tokenizer, prompts, texts, d.max_prompt_len,
                                    d.max_response_len)
    out = {"gold_mean": float(gold.mean()), "gold_std": float(gold.std())}
    k = stage_cfg.samples_table
    rows = [dict(prompt=p, completion=t, gold=float(g)) for p, t, g in zip(prompts[:k], texts[:k], gold)]
    if rm_params is not None:
      proxy = score_batched(rm_params, tokens, mask, run.model_cfg, ensemble=ensemble,
                            batch_size=run.config.eval.batch_size, pool=pool)
      if ensemble:
        out["proxy_std"] = float(proxy.std(0).mean())
        proxy = proxy.mean(0) - uncertainty_coef * proxy.std(0)
      out["proxy_mean"] = float(proxy.mean())
      for row, s in zip(rows, proxy):
        row["proxy"] = float(s)
    if extra is not None:
      out.update(extra(params, tokens, mask))
    out["response_words"] = float(np.mean([len(t.split()) for t in texts]))
    tables.append(rows)
    return out
  evaluate.tables = tables
  return evaluate


def plot_ppo_curves(workdir: str, stage: str = "ppo", kl_target: float | None = None) -> str | None:
  """`plots/<stage>_curves.png`: proxy (RM) reward, gold (simulated human) reward and KL per
  iteration of the training rollouts, with the held-out eval points and the KL target."""
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  from rlhfjax.metrics import read_metrics
  rows = read_metrics(workdir)
  train = sorted((r for r in rows if r.get("stage") == stage), key=lambda r: r["step"])
  evals = sorted((r for r in rows if r.get("stage") == f"{stage}_eval" and "gold_mean" in r),
                 key=lambda r: r["step"])
  if not train:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
  it = [r["step"] for r in train]
  series = [("proxy reward (RM)", "reward_mean", "proxy_mean"),
            ("gold reward (simulated human)", "gold_reward_mean", "gold_mean"),
            ("KL(policy || reference), nats/seq", "kl_seq_mean", None)]
  for ax, (title, key, ekey) in zip(axes, series):
    ax.plot(it, [r.get(key, np.nan) for r in train], label="train rollouts")
    if ekey and evals:
      ax.plot([r["step"] for r in evals], [r[ekey] for r in evals], "o--", label="held-out eval")
    if key == "kl_seq_mean" and kl_target:
      ax.axhline(kl_target, color="gray", ls=":", label="controller target")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PPO iteration", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "plots", f"{stage}_curves.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _gold_metrics(texts, examples) -> dict:
  """The simulated human's gold score of the rollout's texts (logged beside the proxy)."""
  from rlhfjax.data.labeler import gold_scores
  from rlhfjax.rewards.base import prompt_text
  gold = gold_scores([prompt_text(e["prompt"]) for e in examples], texts, [e.get("answer") for e in examples])
  return {"gold_reward_mean": float(gold.mean()), "gold_reward_std": float(gold.std())}


@register_stage("ppo")
class PPOStage(RLStage):
  """PPO (or any `rl.algo`) from the SFT policy against the reward model of the `rm` stage."""

  @classmethod
  def check_config(cls, config):
    rl_configs(config)
    if get_field(config, "ppo") is not None:
      to_dataclass(PPOStageConfig, config.ppo)

  def __init__(self, run: Run):
    super().__init__(run)
    section = get_field(run.config, "ppo")
    self.stage_cfg = to_dataclass(PPOStageConfig, section) if section is not None else PPOStageConfig()
    if self.stage_cfg.value_init not in ("rm", "sft"):
      raise ValueError(f"config.ppo.value_init must be 'rm' or 'sft', got {self.stage_cfg.value_init!r}")
    rm = get_field(run.config, "rm")
    self.ensemble = rm is not None and int(rm.ensemble_size) > 1
    self.uncertainty_coef = float(rm.uncertainty_coef) if rm is not None else 1.0
    self.pool = str(rm.pool) if rm is not None else "last"

  def prepare(self):
    self.rm_params = stage_params(self.run, "rm")
    super().prepare()
    self.gold_eval = gold_eval(self.run, self.models.policy, self.rm_params, self.sampling,
                               self.stage_cfg, ensemble=self.ensemble,
                               uncertainty_coef=self.uncertainty_coef, pool=self.pool)

  def make_scorer(self):
    from rlhfjax.rewards.scorers import reward_model_scorer
    return reward_model_scorer(self.rm_params, self.run.model_cfg, ensemble=self.ensemble,
                               uncertainty_coef=self.uncertainty_coef, pool=self.pool,
                               extra_metrics=_gold_metrics)

  def value_init(self):
    if self.stage_cfg.value_init == "rm":
      return jax.tree.map(lambda x: x[0], self.rm_params) if self.ensemble else self.rm_params  # member 0
    return self.policy_init

  def evaluate(self, state):
    out, samples = super().evaluate(state)
    out.update(self.gold_eval(state.policy.params))
    return out, samples

  def result(self, state, result):
    result = super().result(state, result)
    run, algo = self.run, self.algo
    if self.gold_eval.tables:
      run.writer.write_samples("ppo_gold_eval", self.loop.iterations, self.gold_eval.tables[-1])
    if "before_gold_mean" in result and "after_gold_mean" in result:
      gain = result["after_gold_mean"] - result["before_gold_mean"]
      result["gold_gain"] = gain
      result["gold_gain_in_sft_std"] = gain / max(result["before_gold_std"], 1e-8)
    result["kl_target"] = algo.kl_target if algo.adaptive_kl else None
    kls = [float(x) for x in jax.device_get(self.kl_history)]
    if kls:  # KL(policy || reference) of the last tenth of the iterations' rollouts
      result["kl_seq_mean"] = float(np.mean(kls[-max(1, len(kls) // 10):]))
    result["ensemble_size"] = int(get_field(run.config, "rm").ensemble_size) if self.ensemble else 1
    result["value_init"] = "shared_trunk" if algo.shared_trunk else self.stage_cfg.value_init
    result["update_variant"] = self.loop.update_variant
    run.writer.flush()
    plot_ppo_curves(run.workdir, "ppo", algo.kl_target if algo.adaptive_kl else None)
    return result
