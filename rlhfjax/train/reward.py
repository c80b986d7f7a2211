"""Reward models from comparisons: losses, the jitted sharded step, vmapped ensembles, normalization.

Batches have a comparison axis K (`collate_preferences`: pairs chosen first, rankings best to
worst). The step scores all `[B*K, T]` responses in ONE forward and forms the K(K−1)/2 pairwise
differences from the `[B, K]` scores (InstructGPT, Ouyang et al. 2022, eq. 1). Ensembles stack N
members' states on a leading axis and `jax.vmap` the same step (one compile); members differ by
head init and, with `bootstrap`, Poisson(1) example weights from their own rng. `norm_gain` /
`norm_bias` are not trained: `normalize_params` sets them after training so the reference
policy's samples score mean 0 / std 1. Scoring lives in `rlhfjax.rewards.scorers`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from rlhfjax.models.heads import RewardModel, transplant_trunk
from rlhfjax.models.init import _dummy_inputs
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import batch_sharding, logical_to_sharding, replicated
from rlhfjax.rewards.scorers import score_batched
from rlhfjax.train.state import OptimConfig, TrainState

RM_BATCH_KEYS = ("tokens", "mask", "positions", "valid", "margin")
NORM_PARAMS = ("norm_gain", "norm_bias")


@dataclasses.dataclass(frozen=True)
class RMConfig:
  """The `rm` stage (see experiments/preference.py for the documented config fields)."""

  format: str = "pairs"  # "pairs" or "rankings"
  ranking_size: int = 4  # K of K-way rankings
  pool: str = "last"  # per-token head outputs -> score: "last" | "sum" | "mean" (`RewardModel`)
  train_file: str = ""  # .jsonl / .parquet of human comparisons; "" = the simulated labeler
  test_file: str = ""  # held-out .jsonl / .parquet (needed with train_file)
  file_keys: str = ""  # "ours=theirs,..." for prompt/chosen/rejected/margin/answer/responses
  epochs: float = 1.0  # passes over the comparisons (when steps == 0)
  steps: int = 0  # optimizer updates; 0 = epochs * records / batch_size
  batch_size: int = 32  # comparisons (pairs or rankings) per update
  learning_rate: float = 1e-3  # peak AdamW learning rate
  warmup_steps: int = 10  # linear warmup
  min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
  weight_decay: float = 0.0  # decoupled weight decay on matrices
  grad_clip: float = 1.0  # global-norm clip (0 = off)
  margin_coef: float = 0.0  # loss margin = margin_coef * record margin (0 = plain BT)
  center_coef: float = 0.0  # reward-centering coefficient (Eisenstein et al. 2023 use 0.01)
  ensemble_size: int = 1  # N reward models trained together with vmap
  bootstrap: bool = False  # ensemble members see Poisson(1)-reweighted batches
  uncertainty_coef: float = 1.0  # λ in mean − λ·std when RL scores with an ensemble
  norm_samples: int = 512  # reference-policy responses used to normalize scores
  eval_batch_size: int = 64  # responses per scoring call in evaluation
  log_every: int = 20  # metrics every N steps
  eval_every: int = 0  # held-out eval every N steps (0 = only at the end)
  checkpoint_every: int = 100  # save every N steps (the normalized final state is saved at the end)
  keep_checkpoints: int = 2  # checkpoints kept

  def optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                       min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                       grad_clip=self.grad_clip)

  def loss(self) -> "LossConfig":
    return LossConfig(margin_coef=self.margin_coef, center_coef=self.center_coef,
                      bootstrap=self.bootstrap, pool=self.pool)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss settings of the step (hashable)."""

  margin_coef: float = 0.0
  center_coef: float = 0.0
  bootstrap: bool = False
  pool: str = "last"  # see `reward_forward`


# -- Losses


def _weighted_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-6)


def bradley_terry_loss(chosen, rejected, *, margin=0.0, center_coef: float = 0.0, weights=None):
  """Bradley–Terry loss of [B] `chosen` / `rejected` rewards, (optionally `weights`-) averaged:

  `-log σ(r_c − r_r − m) + coef·(r_c + r_r)²` (Ouyang et al. 2022 eq. 1; margin m, scalar or [B],
  as in Touvron et al. 2023 §3.2.2; centering as in Eisenstein et al. 2023). Returns (loss,
  metrics) with `loss`, `nll`, `center`, `accuracy` (r_c > r_r), `margin` (mean r_c − r_r).
  """
  chosen, rejected = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
  w = jnp.ones_like(chosen) if weights is None else jnp.asarray(weights, jnp.float32)
  diff = chosen - rejected
  nll = jax.nn.softplus(-(diff - margin))  # -log σ(x) = softplus(-x)
  center = center_coef * jnp.square(chosen + rejected)
  loss = _weighted_mean(nll + center, w)
  return loss, {"loss": loss, "nll": _weighted_mean(nll, w), "center": _weighted_mean(center, w),
                "accuracy": _weighted_mean((diff > 0).astype(jnp.float32), w),
                "margin": _weighted_mean(diff, w)}


def ranking_loss(rewards, *, valid=None, margin=0.0, center_coef: float = 0.0, weights=None):
  """Bradley–Terry over the K(K−1)/2 ordered pairs of each ranking of [B, K] `rewards` (column 0
  the best; `valid` [B, K] masks padding); K = 2 is exactly `bradley_terry_loss`.

  Each ranking contributes the mean over its valid pairs (InstructGPT's 1/C(K,2)), then rankings
  are averaged (with `weights` [B]). Metrics as `bradley_terry_loss`, `accuracy` and `margin` over
  all valid pairs.
  """
  r = jnp.asarray(rewards, jnp.float32)
  b, k = r.shape
  v = jnp.ones_like(r) if valid is None else jnp.asarray(valid, jnp.float32)
  w = jnp.ones((b,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  m = jnp.broadcast_to(jnp.asarray(margin, jnp.float32), (b,))[:, None, None]
  diff = r[:, :, None] - r[:, None, :]  # [B, K, K]: r_i − r_j
  pair_mask = jnp.triu(jnp.ones((k, k), jnp.float32), 1)[None] * v[:, :, None] * v[:, None, :]
  nll = jax.nn.softplus(-(diff - m))
  center = center_coef * jnp.square(r[:, :, None] + r[:, None, :])
  n_pairs = jnp.maximum(pair_mask.sum((1, 2)), 1.0)  # [B]
  per_rank = lambda x: jnp.sum(x * pair_mask, (1, 2)) / n_pairs  # noqa: E731
  loss = _weighted_mean(per_rank(nll + center), w)
  pw = pair_mask * w[:, None, None]
  return loss, {"loss": loss, "nll": _weighted_mean(per_rank(nll), w),
                "center": _weighted_mean(per_rank(center), w),
                "accuracy": _weighted_mean((diff > 0).astype(jnp.float32), pw),
                "margin": _weighted_mean(diff, pw)}


# -- The step


def reward_forward(params, tokens, positions, mask, model_cfg: TransformerConfig, pool: str = "last"):
  """Scores [N] of N sequences [N, T]: the reward model's one forward pass (`RewardModel`'s
  readout: `pool` the per-token head outputs, then gain/bias)."""
  return RewardModel(model_cfg, pool).apply({"params": params}, tokens, positions, mask)


def reward_loss(params, batch, rng, *, model_cfg: TransformerConfig, loss_cfg: LossConfig):
  """Ranking loss of a batch (`tokens, mask, positions` [B, K, T], `valid` [B, K], `margin` [B]),
  every response scored once; `rng` draws the bootstrap weights."""
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)  # noqa: E731
  scores = reward_forward(params, flat(batch["tokens"]), flat(batch["positions"]), flat(batch["mask"]),
                          model_cfg, loss_cfg.pool).reshape(b, k)  # [B, K]
  weights = (jax.random.poisson(rng, 1.0, (b,)).astype(jnp.float32) if loss_cfg.bootstrap else None)
  loss, metrics = ranking_loss(scores, valid=batch["valid"], margin=loss_cfg.margin_coef * batch["margin"],
                               center_coef=loss_cfg.center_coef, weights=weights)
  metrics["reward_mean"] = jnp.sum(scores * batch["valid"]) / jnp.maximum(batch["valid"].sum(), 1.0)
  return loss, metrics


def freeze_norm(grads):
  """Zero the gradients of `norm_gain`/`norm_bias`: they are set by normalization, not trained."""
  return {k: (jax.tree.map(jnp.zeros_like, v) if k in NORM_PARAMS else v) for k, v in grads.items()}


def reward_train_step(state: TrainState, batch, *, model_cfg: TransformerConfig,
                      tx: optax.GradientTransformation, loss_cfg: LossConfig):
  """One AdamW update of one reward model. Pure; jit with `make_reward_step`, vmap for ensembles."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(reward_loss, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, batch, rng, model_cfg=model_cfg, loss_cfg=loss_cfg)
  grads = freeze_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), metrics


def rm_batch_shardings(mesh, rules):
  ndims = {"tokens": 3, "mask": 3, "positions": 3, "valid": 2, "margin": 1}
  return {k: batch_sharding(mesh, ndims[k], rules) for k in RM_BATCH_KEYS}


def make_reward_step(model_cfg: TransformerConfig, tx, loss_cfg: LossConfig, shardings, mesh, rules,
                     *, ensemble: bool = False):
  """`jax.jit` of the reward step with explicit in/out shardings; the state is donated.

  With `ensemble=True` the state is stacked over members (`create_reward_state(..., n=N)`) and the
  same step is `jax.vmap`ped over it with the batch shared; metrics come back per member, [N].
  """
  step = functools.partial(reward_train_step, model_cfg=model_cfg, tx=tx, loss_cfg=loss_cfg)
  if ensemble:
    step = jax.vmap(step, in_axes=(0, None))
  return jax.jit(step, in_shardings=(shardings, rm_batch_shardings(mesh, rules)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


# -- States (single and stacked ensembles)


def _member_state(rng, trunk, *, module, tx, boxed: bool):
  init_rng, state_rng = jax.random.split(rng)
  params = module.init(init_rng, *_dummy_inputs(8))["params"]
  if not boxed:
    params = nn.unbox(params)
    if trunk is not None:
      params = transplant_trunk(params, {"trunk": trunk})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def reward_state_shardings(model_cfg: TransformerConfig, tx, mesh, rules, n: int | None = None):
  """(abstract state, NamedSharding tree) of one reward model, or of `n` stacked members (their
  leading axis replicated, every other axis sharded as the single model's)."""
  module = RewardModel(model_cfg)
  boxed = jax.eval_shape(functools.partial(_member_state, trunk=None, module=module, tx=tx, boxed=True),
                         jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  abstract = nn.unbox(boxed)
  if n is not None:
    specs = jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda x: isinstance(x, P))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), abstract)
  return abstract, logical_to_sharding(specs, mesh, rules)


def create_reward_state(model_cfg: TransformerConfig, tx, rng, mesh, rules, *, trunk=None,
                        n: int | None = None):
  """(sharded reward-model TrainState, shardings): its trunk from `trunk` (e.g. the SFT policy's
  `params["trunk"]`), a fresh head; with `n`, N members stacked on a leading axis, member i exactly
  `create_reward_state(..., rng=jax.random.split(rng, n)[i])`."""
  rules = tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in rules)  # hashable
  init, shardings = _jitted_init(model_cfg, tx, mesh, rules, n)
  if trunk is not None:
    trunk = jax.device_put(trunk, shardings.params["trunk"] if n is None else
                           jax.tree.map(_drop_leading, shardings.params["trunk"]))
  return init(rng, trunk), shardings


@functools.lru_cache(maxsize=16)
def _jitted_init(model_cfg, tx, mesh, rules, n):
  """(jitted init(rng, trunk) -> state, shardings), compiled once per (model, optimizer, mesh, n)."""
  _, shardings = reward_state_shardings(model_cfg, tx, mesh, rules, n)
  init = functools.partial(_member_state, module=RewardModel(model_cfg), tx=tx, boxed=False)
  if n is not None:
    member = init
    init = lambda r, t: jax.vmap(member, in_axes=(0, None))(jax.random.split(r, n), t)  # noqa: E731
  return jax.jit(init, out_shardings=shardings), shardings


def _drop_leading(s):
  return jax.sharding.NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))


# -- Normalization


def set_normalization(params, scores, *, eps: float = 1e-6):
  """Params whose scores are `(s − mean) / std` of the given `scores` [B] (made with `params`).

  Composes with the current gain/bias, so it normalizes whatever the head computes now:
  new_gain = gain/std, new_bias = (bias − mean)/std.
  """
  scores = jnp.asarray(scores, jnp.float32)
  mean, std = scores.mean(), jnp.maximum(scores.std(), eps)
  out = dict(params)
  out["norm_gain"] = params["norm_gain"] / std
  out["norm_bias"] = (params["norm_bias"] - mean) / std
  return out


def normalize_params(params, tokens, mask, model_cfg: TransformerConfig, *, ensemble: bool = False,
                     batch_size: int = 0, pool: str = "last"):
  """Set gain/bias so the reference sample `tokens`/`mask` [M, T] scores mean 0 / std 1 (per member
  for ensembles). Returns (params, {"mean", "std"} of the scores before)."""
  scores = score_batched(params, tokens, mask, model_cfg, ensemble=ensemble, batch_size=batch_size,
                         pool=pool)
  if ensemble:
    new = jax.vmap(set_normalization)(params, jnp.asarray(scores))
    return new, {"mean": np.mean(scores, 1), "std": np.std(scores, 1)}
  return set_normalization(params, scores), {"mean": float(np.mean(scores)), "std": float(np.std(scores))}
