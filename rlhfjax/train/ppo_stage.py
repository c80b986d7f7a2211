"""The `ppo` stage: RLHF against the learned reward model, with a KL-controlled frozen reference.

Runs after `sft` and `rm` (`config.stages = "sft,rm,ppo"`), or alone on a workdir where both
finished. The policy and the frozen reference start from the SFT parameters; the separate critic
from the RM's trunk (`ppo.value_init = "rm"`, lm-human-preferences) or the SFT one (`"sft"`) with a
zero value head (`rl.shared_trunk = True`: one trunk, LM + value heads, `ppo.value_init` unused).
The scorer is the RM on device; an ensemble (`rm.ensemble_size > 1`) scores `mean − λ·std`
(λ = `rm.uncertainty_coef`). Any `rl.algo` works (critic-free ones ignore the critic).

The iteration is `RLStage`'s; this stage adds the simulated human's gold score of every rollout
(`gold_reward_mean`, beside the proxy `reward_mean`), a held-out gold/proxy eval (`gold_mean`,
`gold_std`, `proxy_mean`; with `ppo.eval_kl` also `kl_seq_mean`, KL(policy || SFT) of those samples)
with a samples table, and `plots/ppo_curves.png` (proxy, gold, KL).

Early stopping without gold (`ppo.early_stop`; off by default), on one of two signals:
`"rm_std"`, the reward-model ensemble's disagreement on the policy's own rollout (std across members,
averaged over the batch; needs `rm.ensemble_size > 1`), which stops when it *rises*; or
`"label_agreement"`, which asks the labeler for `ppo.early_stop_labels` fresh comparisons per
reading — a rollout sample against a sample of the policy as it was at the previous reading (SFT at
the first) — and stops when the reward model's agreement with them *falls* (`label_agreement`).
A reading comes every `ppo.early_stop_every` iterations; the baseline is the mean of the first
`ppo.early_stop_baseline` readings, and once `ppo.early_stop_patience` readings in a row are past
`ppo.early_stop_factor` x baseline (above for a rising signal, below for a falling one) the policy
is frozen: the remaining iterations neither sample nor update (their metrics rows hold
`early_stopped=1`), and the final eval and checkpoint are of the policy after the iteration whose
reading stopped it (`early_stopped_at` in the result; `early_stop_labels_used` the labels asked).
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
  # Re-seeds the RL loop alone (0 = the run's seed): rollout prompt order, sampling noise and the
  # critic's fresh value head; the data, SFT, reward model and held-out eval prompts/noise stay.
  rl_seed: int = 0
  eval_kl: bool = False  # the held-out eval also logs kl_seq_mean: Σ log π − log π_SFT of its samples
  # Early stopping on a gold-free signal (module docstring): "" (off), "rm_std" (the RM ensemble's
  # disagreement on the rollout; stops when it rises) or "label_agreement" (the RM's agreement with
  # fresh labels on policy-vs-SFT pairs; stops when it falls). The baseline is the signal's mean over
  # its first `early_stop_baseline` readings (one every `early_stop_every` iterations); the stop comes
  # once `early_stop_patience` readings in a row are past `early_stop_factor` x baseline (a factor
  # > 1 for a rising signal, < 1 for a falling one).
  early_stop: str = ""
  early_stop_factor: float = 2.0
  early_stop_baseline: int = 5
  early_stop_patience: int = 2
  early_stop_every: int = 1  # iterations between readings
  early_stop_labels: int = 32  # label_agreement: fresh comparisons asked per reading

  def __post_init__(self):
    if self.early_stop not in EARLY_STOP_SIGNALS:
      raise ValueError(f"config.ppo.early_stop must be one of {tuple(EARLY_STOP_SIGNALS)}, "
                       f"got {self.early_stop!r}")
    if not self.early_stop:
      return
    rises = EARLY_STOP_SIGNALS[self.early_stop] == "rise"
    if (self.early_stop_factor <= 1.0) if rises else not 0.0 < self.early_stop_factor < 1.0:
      raise ValueError(f"config.ppo.early_stop_factor must be {'> 1' if rises else 'in (0, 1)'} for "
                       f"the {EARLY_STOP_SIGNALS[self.early_stop]}ing signal {self.early_stop!r}, "
                       f"got {self.early_stop_factor}")
    if min(self.early_stop_baseline, self.early_stop_patience, self.early_stop_every,
           self.early_stop_labels) < 1:
      raise ValueError("config.ppo.early_stop_baseline, _patience, _every and _labels must be >= 1")


# early-stop signal -> the direction in which it signals over-optimization ("" = off)
EARLY_STOP_SIGNALS = {"": "", "rm_std": "rise", "label_agreement": "fall"}


class EarlyStop:
  """The stop rule on one scalar per reading: baseline = mean of the first `baseline` finite
  readings; `update` returns True (and stays stopped) once `patience` readings in a row are past
  factor x baseline (above it when `direction="rise"`, below it when "fall"). Host state is a small
  dict (`state` / `load`) so a resumed run decides the same."""

  def __init__(self, factor: float, baseline: int, patience: int, direction: str = "rise"):
    if direction not in ("rise", "fall"):
      raise ValueError(f"direction must be 'rise' or 'fall', got {direction!r}")
    self.factor, self.n_baseline, self.patience = float(factor), int(baseline), int(patience)
    self.direction = direction
    self.values: list[float] = []
    self.streak = 0
    self.stopped_at: int | None = None

  @property
  def baseline(self) -> float | None:
    if len(self.values) < self.n_baseline:
      return None
    return float(np.mean(self.values[:self.n_baseline]))

  @property
  def threshold(self) -> float | None:
    b = self.baseline
    return None if b is None else self.factor * b

  def past(self, value: float) -> bool:
    """Whether `value` is past the threshold (False before the baseline is in, or for NaN)."""
    t = self.threshold
    if t is None or not np.isfinite(value):
      return False
    return value > t if self.direction == "rise" else value < t

  def update(self, it: int, value: float) -> bool:
    """Record iteration `it`'s reading; True once stopped (the reading that stopped it included)."""
    if self.stopped_at is not None:
      return True
    value = float(value)
    if len(self.values) < self.n_baseline:
      if np.isfinite(value):
        self.values.append(value)
      return False
    self.streak = self.streak + 1 if self.past(value) else 0
    if self.streak >= self.patience:
      self.stopped_at = int(it)
    return self.stopped_at is not None

  def state(self) -> dict:
    return {"values": list(self.values), "streak": self.streak, "stopped_at": self.stopped_at}

  def load(self, state: dict | None) -> None:
    if state:
      self.values, self.streak = [float(v) for v in state["values"]], int(state["streak"])
      self.stopped_at = state["stopped_at"]


def sample_kl_fn(run: Run, model, ref_params, temperature: float = 1.0, batch_size: int = 64):
  """`extra(params, tokens, mask) -> {"kl_seq_mean"}` for `gold_eval`: KL(policy || reference) of
  the policy's own samples, the mean over them of Σ_t log π(y_t) − log π_ref(y_t) (k1, nats/seq)."""
  from rlhfjax.models.sequence import response_logprobs
  p = run.config.data.max_prompt_len

  @jax.jit
  def seq_logp(params, tokens, mask):
    return response_logprobs(params, model, tokens[:, :p], mask[:, :p], tokens[:, p:], mask[:, p:],
                             temperature).sum(-1)

  def logps(params, tokens, mask):
    m = len(tokens)
    pad = -m % batch_size
    tokens, mask = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (tokens, mask))
    out = jax.device_get([seq_logp(params, tokens[i:i + batch_size], mask[i:i + batch_size])
                          for i in range(0, len(tokens), batch_size)])
    return np.concatenate(out)[:m]

  def extra(params, tokens, mask) -> dict:
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return {"kl_seq_mean": float(np.mean(logps(params, tokens, mask) - logps(ref_params, tokens, mask)))}
  return extra


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
      cfg = to_dataclass(PPOStageConfig, config.ppo)
      rm = get_field(config, "rm")
      if cfg.early_stop == "rm_std" and (rm is None or int(rm.ensemble_size) < 2):
        raise ValueError("config.ppo.early_stop='rm_std' watches the reward-model ensemble's "
                         "disagreement: set config.rm.ensemble_size >= 2")

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
    c = self.stage_cfg
    if c.rl_seed:  # the same iterator and key as RLStage's, seeded apart
      self.data = self.data.reseeded(self.data.seed + 7919 * c.rl_seed)
      self.rng = jax.random.fold_in(self.rng, c.rl_seed)
    self.early = EarlyStop(c.early_stop_factor, c.early_stop_baseline, c.early_stop_patience,
                           EARLY_STOP_SIGNALS[c.early_stop]) if c.early_stop else None
    self._stopped_eval = None  # (metrics, samples) of the frozen policy once stopped
    self._rollout = None  # (texts, examples) of the iteration's rollout, for label_agreement
    self._anchor = None  # label_agreement: the policy after the previous reading (None: SFT)
    self.labels_used = 0  # fresh comparisons asked by label_agreement so far

  def prepare(self):
    self.rm_params = stage_params(self.run, "rm")
    super().prepare()
    extra = sample_kl_fn(self.run, self.models.policy, self.policy_init, self.sampling.temperature,
                         self.run.config.eval.batch_size) if self.stage_cfg.eval_kl else None
    self.gold_eval = gold_eval(self.run, self.models.policy, self.rm_params, self.sampling,
                               self.stage_cfg, ensemble=self.ensemble,
                               uncertainty_coef=self.uncertainty_coef, pool=self.pool, extra=extra)

  @property
  def stopped_at(self) -> int | None:
    return self.early.stopped_at if self.early is not None else None

  def step(self, state, it):
    if self.early is None:
      return super().step(state, it)
    if self.stopped_at is not None:  # frozen: no sampling, no update
      return state, {"early_stopped": 1.0}, None
    state, metrics, units = super().step(state, it)
    c = self.stage_cfg
    if c.early_stop == "label_agreement":  # every row carries the keys (rows are averaged by key)
      reading = self.label_agreement(it) if it % c.early_stop_every == 0 else {}
      if it % c.early_stop_every == 0:  # the next reading compares against this policy
        self._anchor = jax.tree.map(lambda x: x.copy(), state.policy.params)
      metrics.update({k: reading.get(k, float("nan")) for k in
                      ("label_agreement", "label_win_rate", "label_pairs")})
      metrics["labels_used"] = float(self.labels_used)
    if it % c.early_stop_every == 0:
      signal = float(metrics[c.early_stop])  # host floats (scorer / fresh labels)
      if self.early.update(it, signal):
        log.info("%s: early stop after iteration %d: %s %.4f %s %.2f x baseline %.4f for %d "
                 "readings in a row", self.name, it, c.early_stop, signal,
                 ">" if self.early.direction == "rise" else "<", self.early.factor,
                 self.early.baseline, self.early.patience)
    metrics["early_stopped"] = 0.0  # this iteration's update happened
    metrics["early_stop_threshold"] = self.early.threshold if self.early.threshold is not None \
        else float("nan")  # NaN until the baseline readings are in
    return state, metrics, units

  def label_agreement(self, it: int) -> dict:
    """The gold-free reading of `early_stop="label_agreement"`: for the first
    `early_stop_labels` prompts of this iteration's rollout, one fresh sample each of the anchor
    policy (the policy as it was at the previous reading; SFT at the first) and one fresh comparison
    (rollout sample vs anchor sample) from the labeler — the simulated human's noisy Bradley–Terry
    judgement, as a person would give it (no gold score leaves the labeler) — then how often the
    reward model (the score PPO maximizes) orders the pair as the label does. While PPO's gains are
    real the two agree; once the proxy rises where the labels do not, agreement falls toward and
    below chance. Identical pairs are not asked. Also the labels' win rate of the rollout over the
    anchor. (The anchor is not checkpointed: a resumed run compares its first reading with SFT.)"""
    from rlhfjax.data import encode_sequences
    from rlhfjax.data.labeler import LabelerConfig, bt_prefers_first, gold_score, sample_policy
    from rlhfjax.rewards.base import prompt_text
    from rlhfjax.rewards.scorers import score_batched
    run, d, g = self.run, self.run.config.data, self.algo.group_size
    texts, examples = self._rollout
    texts, examples = texts[::g][:self.stage_cfg.early_stop_labels], examples[::g][:self.stage_cfg.early_stop_labels]
    prompts = [e["prompt"] for e in examples]
    anchor = self._anchor if self._anchor is not None else self.policy_init
    ref = [t[0] for t in sample_policy(anchor, run.model_cfg, run.tokenizer, prompts, n=1,
                                       max_prompt_len=d.max_prompt_len,
                                       max_new_tokens=self.sampling.max_new_tokens or d.max_response_len,
                                       temperature=self.sampling.temperature, batch_size=len(prompts),
                                       rng=jax.random.fold_in(jax.random.key(run.seed + 606), it))]
    asked = [i for i in range(len(prompts)) if texts[i].strip() != ref[i].strip()]
    if not asked:
      return {"label_pairs": 0.0}
    self.labels_used += len(asked)
    lab = get_field(run.config, "labeler")
    tau = to_dataclass(LabelerConfig, lab).temperature if lab is not None else LabelerConfig().temperature
    rng = np.random.default_rng([run.seed, 606, it])
    prefers_policy = np.asarray([
        bt_prefers_first(gold_score(prompt_text(prompts[i]), texts[i], examples[i].get("answer")),
                         gold_score(prompt_text(prompts[i]), ref[i], examples[i].get("answer")), tau, rng)
        for i in asked])
    ps = [prompts[i] for i in asked]
    tokens, mask = encode_sequences(run.tokenizer, ps + ps, [texts[i] for i in asked] + [ref[i] for i in asked],
                                    d.max_prompt_len, d.max_response_len)
    s = score_batched(self.rm_params, tokens, mask, run.model_cfg, ensemble=self.ensemble,
                      batch_size=run.config.eval.batch_size, pool=self.pool)
    if self.ensemble:
      s = s.mean(0) - self.uncertainty_coef * s.std(0)
    rm_prefers_policy = s[:len(asked)] > s[len(asked):]
    return {"label_agreement": float(np.mean(rm_prefers_policy == prefers_policy)),
            "label_win_rate": float(prefers_policy.mean()), "label_pairs": float(len(asked))}

  def host_state(self):
    out = super().host_state()
    if self.early is not None:
      out["early_stop"] = {**self.early.state(), "labels_used": self.labels_used}
    return out

  def set_host_state(self, host_state):
    super().set_host_state(host_state)
    if self.early is not None:
      self.early.load(host_state.get("early_stop"))
      self.labels_used = int((host_state.get("early_stop") or {}).get("labels_used", 0))

  def make_scorer(self):
    from rlhfjax.rewards.scorers import reward_model_scorer
    scorer = reward_model_scorer(self.rm_params, self.run.model_cfg, ensemble=self.ensemble,
                                 uncertainty_coef=self.uncertainty_coef, pool=self.pool,
                                 extra_metrics=_gold_metrics)
    if self.stage_cfg.early_stop != "label_agreement":
      return scorer

    def keep_rollout(texts, examples, rollout):  # label_agreement reads the rollout's texts
      self._rollout = (texts, examples)
      return scorer(texts, examples, rollout)
    return keep_rollout

  def value_init(self):
    if self.stage_cfg.value_init == "rm":
      return jax.tree.map(lambda x: x[0], self.rm_params) if self.ensemble else self.rm_params  # member 0
    return self.policy_init

  def evaluate(self, state):
    if self.stopped_at is not None and self._stopped_eval is not None:
      return dict(self._stopped_eval[0]), list(self._stopped_eval[1])  # the policy is frozen
    out, samples = super().evaluate(state)
    out.update(self.gold_eval(state.policy.params))
    if self.stopped_at is not None:
      self._stopped_eval = (dict(out), list(samples))
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
    if self.early is not None:
      result["early_stop"] = self.stage_cfg.early_stop
      result["early_stopped_at"] = self.stopped_at  # None: ran every iteration
      result["early_stop_baseline"] = self.early.baseline
      result["early_stop_threshold"] = self.early.threshold
      if self.stage_cfg.early_stop == "label_agreement":
        result["early_stop_labels_used"] = self.labels_used
    run.writer.flush()
    plot_ppo_curves(run.workdir, "ppo", algo.kl_target if algo.adaptive_kl else None)
    return result
