"""The `dpo` stage: the SFT policy trained on comparisons directly (DPO / IPO), no reward model.

Runs after `sft` (`config.stages = "sft,dpo"`), or alone on a workdir whose `sft` finished. The
comparisons are the `rm` stage's (`config.rm` format and files, `config.labeler`, through
`preference_files` / `prepare_preferences`): the same simulated labels and split as an `rm` + `ppo`
run with the same seed. Policy and frozen reference start from the SFT parameters. The jitted,
sharded step (state donated) scores a batch's `[B, K]` responses under both with one forward each
and takes `rlhfjax.rl.dpo_loss` over the K(K−1)/2 ordered pairs of each record, every record
weighing 1 (pairs: K = 2). Eval: the loss and implicit-reward accuracy on the held-out comparisons
(`gold_accuracy`: agreement with the gold preference), and `ppo_stage.gold_eval` — the gold score
of one sample per held-out prompt, measured as the `ppo` stage measures it — with `kl_seq_mean`,
KL(policy || reference) in nats per response on those samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfjax import rl
from rlhfjax.config import get_field, to_dataclass
from rlhfjax.data import DataIterator, encode_sequences
from rlhfjax.data.labeler import LabelerConfig, gold_scores
from rlhfjax.data.preferences import collate_preferences, responses_of
from rlhfjax.models.heads import PolicyModel
from rlhfjax.models.sequence import response_logprobs
from rlhfjax.parallel import batch_sharding, replicated, shard_batch
from rlhfjax.train.ppo_stage import PPOStageConfig, gold_eval
from rlhfjax.train.reward import RMConfig
from rlhfjax.train.rl_stage import RolloutConfig
from rlhfjax.train.rm_stage import prepare_preferences, preference_files
from rlhfjax.train.stage import Run, Stage, register_stage, stage_params
from rlhfjax.train.state import (OptimConfig, TrainState, create_train_state, make_optimizer,
                                 state_shardings)

DPO_BATCH_KEYS = ("tokens", "mask", "valid")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The `dpo` stage (experiments/dpo_preference.py documents the fields)."""

  beta: float = 0.1  # KL strength β (Rafailov et al. 2023: 0.1)
  loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo" (on length-averaged log-probs, as TRL)
  label_smoothing: float = 0.0  # conservative DPO's label-flip probability ε (0 = DPO)
  epochs: float = 1.0  # passes over the comparisons when steps == 0
  steps: int = 0  # optimizer updates; 0 = epochs * records / batch_size
  batch_size: int = 32  # comparisons per update
  learning_rate: float = 1e-4  # peak AdamW learning rate
  warmup_steps: int = 10  # linear warmup
  min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
  weight_decay: float = 0.0  # decoupled weight decay on matrices
  grad_clip: float = 1.0  # global-norm clip (0 = off)
  eval_batch_size: int = 64  # sequences per log-prob call in evaluation
  gold_eval_prompts: int = 256  # held-out prompts sampled for the gold eval (0 = off)
  samples_table: int = 16  # held-out (prompt, response, gold) rows written after training
  log_every: int = 20  # metrics every N steps
  eval_every: int = 0  # held-out eval every N steps (0 = before and after only)
  checkpoint_every: int = 100  # save every N steps (and at the end)
  keep_checkpoints: int = 2  # checkpoints kept

  def optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                       min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                       grad_clip=self.grad_clip)


def sequence_logps(params, tokens, mask, *, model, prompt_len: int):
  """(summed response log-probs, response lengths) [N] of `[prompt (prompt_len) | response]`
  sequences `tokens`, `mask` [N, T] under the policy `model`."""
  p = prompt_len
  lp = response_logprobs(params, model, tokens[:, :p], mask[:, :p], tokens[:, p:], mask[:, p:])
  return lp.sum(-1), mask[:, p:].sum(-1).astype(jnp.float32)


def record_pairs(logps, valid):
  """[B, K] per-response values (best first) -> (better, worse, weight) [B·C] over the C =
  K(K−1)/2 ordered pairs of each record; a record's valid pairs share weight 1."""
  i, j = np.triu_indices(logps.shape[1], 1)
  w = valid[:, i] * valid[:, j]
  w = w / jnp.maximum(w.sum(1, keepdims=True), 1.0)
  return logps[:, i].reshape(-1), logps[:, j].reshape(-1), w.reshape(-1)


def dpo_batch_loss(params, ref_params, batch, *, model, prompt_len: int, cfg: DPOConfig):
  """`rl.dpo_loss` of a comparison batch (`tokens, mask` [B, K, T], `valid` [B, K])."""
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)  # noqa: E731
  fwd = functools.partial(sequence_logps, tokens=flat(batch["tokens"]), mask=flat(batch["mask"]),
                          model=model, prompt_len=prompt_len)
  (logps, n), (ref, _) = fwd(params), fwd(jax.lax.stop_gradient(ref_params))
  if cfg.loss_type == "ipo":
    logps, ref = logps / jnp.maximum(n, 1.0), ref / jnp.maximum(n, 1.0)
  chosen, rejected, w = record_pairs(logps.reshape(b, k), batch["valid"])
  ref_chosen, ref_rejected, _ = record_pairs(ref.reshape(b, k), batch["valid"])
  return rl.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                     loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, weights=w)


def dpo_train_step(state: TrainState, ref_params, batch, *, model, prompt_len: int, cfg: DPOConfig,
                   tx: optax.GradientTransformation):
  """One AdamW update of the policy. Pure; jit it with `make_dpo_step`."""
  grad_fn = jax.value_and_grad(dpo_batch_loss, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, ref_params, batch, model=model,
                                prompt_len=prompt_len, cfg=cfg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), metrics


def make_dpo_step(model, tx, cfg: DPOConfig, prompt_len: int, shardings, mesh, rules):
  """`jax.jit` of the DPO step with explicit in/out shardings (the reference's are the policy's);
  the state is donated."""
  batch = {k: batch_sharding(mesh, 2 if k == "valid" else 3, rules) for k in DPO_BATCH_KEYS}
  step = functools.partial(dpo_train_step, model=model, prompt_len=prompt_len, cfg=cfg, tx=tx)
  return jax.jit(step, in_shardings=(shardings, shardings.params, batch),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def batched_logps(fn, params, tokens, mask, batch_size: int):
  """Host helper: `fn(params, tokens, mask)` over many sequences in fixed-shape chunks -> NumPy."""
  m = len(tokens)
  tokens, mask = (np.concatenate([x, np.repeat(x[-1:], -m % batch_size, 0)]) for x in (tokens, mask))
  out = jax.device_get([fn(params, tokens[i:i + batch_size], mask[i:i + batch_size])
                        for i in range(0, len(tokens), batch_size)])
  return tuple(np.concatenate(x)[:m] for x in zip(*out))


@register_stage("dpo")
class DPOStage(Stage):
  """DPO (`config.dpo`) from the SFT policy on the `rm` stage's comparisons (`config.rm`,
  `config.labeler`); eval: held-out preference accuracy, gold score and KL of the policy's samples."""

  finite_keys = ("loss", "grad_norm")
  rate_name = "responses_per_s"
  progress_keys = ("loss", "reward_accuracy")
  samples_name = "dpo_gold_eval"

  @classmethod
  def check_config(cls, config):
    cfg = to_dataclass(DPOConfig, get_field(config, "dpo", {}))
    if cfg.loss_type not in rl.dpo.LOSS_TYPES:
      raise ValueError(f"config.dpo.loss_type must be one of {rl.dpo.LOSS_TYPES}, got {cfg.loss_type!r}")

  def __init__(self, run: Run):
    super().__init__(run)
    self.cfg = cfg = to_dataclass(DPOConfig, get_field(run.config, "dpo", {}))
    section = lambda name, cls: to_dataclass(cls, get_field(run.config, name, {}))  # noqa: E731
    self.data_cfg, self.lab = section("rm", RMConfig), section("labeler", LabelerConfig)
    self.k = 2 if self.data_cfg.format == "pairs" else self.data_cfg.ranking_size
    self.log_every, self.eval_every = cfg.log_every, cfg.eval_every
    self.checkpoint_every, self.keep_checkpoints = cfg.checkpoint_every, cfg.keep_checkpoints
    self.total_steps = cfg.steps  # 0 until `prepare` counts the comparisons (epochs)
    self.tx = make_optimizer(cfg.optim(), max(cfg.steps, 1))
    self.module = PolicyModel(run.model_cfg)
    self.logps = jax.jit(functools.partial(sequence_logps, model=self.module,
                                           prompt_len=run.config.data.max_prompt_len))

  def prepare(self):
    run, cfg, d = self.run, self.cfg, self.run.config.data
    self.sft_params = stage_params(run, "sft")
    *paths, self.simulated = preference_files(run, self.data_cfg, self.lab, self.sft_params)
    self.train, self.test, self.reports = prepare_preferences(run, self.data_cfg, paths, self.simulated)
    self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(self.train) / cfg.batch_size))
    self.tx = make_optimizer(cfg.optim(), self.total_steps)
    collate = functools.partial(collate_preferences, tokenizer=run.tokenizer,
                                max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
                                k=self.k)
    self.data = DataIterator(self.train, cfg.batch_size // jax.process_count(), seed=run.seed + 23,
                             collate=collate)
    self.ref_params = jax.device_put(self.sft_params, self.state_spec()[1].params)
    # the held-out responses (flat, record by record) and their ordered pairs, best first
    recs = list(self.test)
    resps = [responses_of(r) for r in recs]
    starts = np.cumsum([0] + [len(x) for x in resps])
    self.test_pairs = np.asarray([(s + a, s + b) for s, x in zip(starts, resps)
                                  for a, b in zip(*np.triu_indices(len(x), 1))]).T
    prompts = [r["prompt"] for r, x in zip(recs, resps) for _ in x]
    flat = [y for x in resps for y in x]
    self.test_gold = gold_scores(prompts, flat, [r["answer"] or None for r, x in zip(recs, resps)
                                                 for _ in x]) if self.simulated else None
    self.test_tokens = encode_sequences(run.tokenizer, prompts, flat, d.max_prompt_len,
                                        d.max_response_len)
    self.ref_test = self._logps(self.ref_params, *self.test_tokens)
    self.gold_eval = gold_eval(run, self.module, None, to_dataclass(
        RolloutConfig, get_field(run.config, "rl_sampling", {})), PPOStageConfig(
            gold_eval_prompts=cfg.gold_eval_prompts, samples_table=cfg.samples_table),
        ensemble=False, uncertainty_coef=0.0, extra=self._kl)

  def _logps(self, params, tokens, mask):
    return batched_logps(self.logps, params, tokens, mask, self.cfg.eval_batch_size)

  def _kl(self, params, tokens, mask) -> dict:
    """KL(policy || reference) of the policy's own samples: mean of Σ_t log π − log π_ref."""
    return {"kl_seq_mean": float(np.mean(self._logps(params, tokens, mask)[0] -
                                         self._logps(self.ref_params, tokens, mask)[0]))}

  def state_spec(self):
    return state_shardings(self.module, self.tx, self.run.mesh, self.run.rules)

  def init_state(self):
    return create_train_state(self.module, self.tx, jax.random.key(self.run.seed + 9), self.run.mesh,
                              self.run.rules, params=self.sft_params)[0]

  def start(self, state):
    _, shardings = self.state_spec()
    self.step_fn = make_dpo_step(self.module, self.tx, self.cfg, self.run.config.data.max_prompt_len,
                                 shardings, self.run.mesh, self.run.rules)

  def step(self, state, step):
    batch = next(self.data)
    batch = {key: batch[key] for key in DPO_BATCH_KEYS}
    state, metrics = self.step_fn(state, self.ref_params, shard_batch(batch, self.run.mesh,
                                                                      self.run.rules))
    return state, metrics, float(np.sum(batch["valid"]))

  def evaluate(self, state):
    """`rl.dpo_loss` metrics on the held-out comparisons, then the gold eval of samples."""
    cfg, (i, j) = self.cfg, self.test_pairs
    (logps, n), (ref, _) = self._logps(state.params, *self.test_tokens), self.ref_test
    if cfg.loss_type == "ipo":
      logps, ref = logps / np.maximum(n, 1), ref / np.maximum(n, 1)
    _, metrics = rl.dpo_loss(logps[i], logps[j], ref[i], ref[j], beta=cfg.beta,
                             loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    out = {k: float(v) for k, v in metrics.items()}
    if self.test_gold is not None:  # the implicit reward's agreement with the gold preference
      gd, rd = self.test_gold[i] - self.test_gold[j], (logps - ref)[i] - (logps - ref)[j]
      out["gold_accuracy"] = float(np.mean(np.sign(rd[gd != 0]) == np.sign(gd[gd != 0])))
    out.update(self.gold_eval(state.params))
    return out, self.gold_eval.tables[-1] if self.gold_eval.tables else []

  def result(self, state, result):
    cfg = self.cfg
    result.update(steps=self.total_steps, beta=cfg.beta, loss_type=cfg.loss_type,
                  label_smoothing=cfg.label_smoothing, format=self.data_cfg.format,
                  train_records=len(self.train), test_records=len(self.test))
    if "before_gold_mean" in result and "after_gold_mean" in result:
      gain = result["after_gold_mean"] - result["before_gold_mean"]
      result.update(gold_gain=gain, gold_gain_in_sft_std=gain / max(result["before_gold_std"], 1e-8))
    for split, rep in self.reports.items():
      result.update({f"{split}_{key}": v for key, v in rep.as_dict().items()})
    return result
