"""The RL core shared by PPO and the critic-free family: experience on device, one jitted update.

    sample -> experience_forwards (jitted; runs while the host scores) -> score
           -> experience_from_forwards (jitted) -> rl_update (jitted, state donated)

PPO (critic + GAE), GRPO, RLOO, REINFORCE++ and best-of-N are advantage estimators and loss
options on one update: `make_experience` computes each algorithm's advantages, `rl_update` runs the
clipped surrogate (plus a value loss with a critic) as a `lax.scan` over epochs x shuffled
minibatches x optional micro-batches, never returning to Python.

The models come in as `RLModels` (interfaces of `rlhfjax.models.sequence`); the core never builds
one. Jitted functions are specialized on exactly `(AlgoConfig, RLModels, temperature)` and the
optimizers. Each micro-batch's loss is weighted by its share of the minibatch's aggregation units
(`_units`), so the accumulated gradient is exactly the whole-minibatch loss's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfjax import rl
from rlhfjax.models.sequence import (Packing, bucket_width, pack_lengths, response_token_stats,
                                     response_values, share_lengths)
from rlhfjax.parallel import axes as ax
from rlhfjax.parallel import batch_sharding, replicated
from rlhfjax.sampling import Rollout
from rlhfjax.sampling.sampler import layout
from rlhfjax.models.heads import transplant_trunk
from rlhfjax.models.transformer import attention_band, map_trunks, stack_layers, unstack_layers
from rlhfjax.train.state import (OptimConfig, TrainState, create_train_state, make_optimizer,
                                 state_shardings)

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "best_of_n")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
  """The RL algorithm (`config.rl`; static). Reference values in comments."""

  algo: str = "grpo"  # ppo | grpo | rloo | reinforce_pp | best_of_n
  group_size: int = 8  # responses per prompt (GRPO 64 in DeepSeekMath; >= 2 for group methods)
  epochs: int = 1  # passes over each batch of experience (PPO 4 in InstructGPT)
  minibatch_size: int = 64  # responses per optimizer step
  microbatch_size: int = 0  # gradient-accumulation chunk; 0 = whole minibatch at once
  clip_eps: float = 0.2  # PPO ratio clip (Schulman et al. 2017)
  clip_eps_high: float = 0.0  # asymmetric upper clip (DAPO 0.28); 0 = same as clip_eps
  dual_clip: float = 0.0  # dual-clip bound c > 1 for negative advantages (Ye et al. 2020); 0 = off
  aggregation: str = "token"  # token | sequence | fixed (loss normalization)
  value_clip: float = 0.2  # critic clip range (lm-human-preferences 0.2); 0 = off
  gamma: float = 1.0  # discount (1.0 for LM RL)
  lam: float = 0.95  # GAE lambda
  kl_coef: float = 0.05  # beta: KL(pi || ref) weight (initial value when adaptive)
  kl_mode: str = "auto"  # reward | loss | none; auto: loss for grpo/best_of_n, reward otherwise
  kl_estimator: str = "k1"  # estimator of the per-token KL penalty in the reward (k1, k2, k3)
  adaptive_kl: bool = False  # Ziegler et al. 2019 proportional controller
  kl_target: float = 6.0  # target sequence KL (nats) for the adaptive controller
  kl_horizon: float = 10_000.0  # controller horizon in samples
  entropy_coef: float = 0.0  # entropy bonus
  whiten_rewards: bool = False  # divide scores by their batch std (scale only)
  whiten_advantages: bool = True  # PPO / RLOO: normalize advantages over masked tokens
  advantage_scale: str = "group"  # GRPO: group | batch | none (Dr. GRPO)
  best_of_n_k: int = 1  # best-of-N: top-k positive, bottom-k negative per group
  missing_eos_penalty: float = 0.0  # added to the score of responses that never emit EOS (e.g. -1)
  shared_trunk: bool = False  # PPO: one trunk with LM + value heads, one optimizer (else separate critic)
  vf_coef: float = 0.1  # value-loss weight in the joint loss when shared_trunk (PPO paper's c1)
  reuse_logprobs: bool = True  # one epoch over one minibatch: the update's own forward gives the old log-probs (see `on_policy`)
  # Pack the rollout's sequences into few rows (`models.sequence.Packing`) so every forward runs over
  # real tokens only; needs one minibatch per step, no micro-batches, built-in models.
  pack: bool = False
  # GRPO-family groups: each group's shared prompt computed once per forward (`models.sequence.
  # share_lengths`; -29 % tokens at 8-token prompts x 8 samples x 16 new tokens, more with long
  # prompts); a packing, so the same needs as `pack`. The rows of a group must share the prompt.
  # A row is prompt + all G responses wide; its attention is banded (`models.transformer.
  # attention_band`: each query scores the prompt and N - 1 + 16 slots, not the row). Measured
  # before the band, on the long peer workload `pack` was faster (0.92 s against 1.08 s).
  share_prompt: bool = False
  # Truncated importance sampling (TIS, Yao et al. 2025): each token's policy-gradient loss times
  # min(pi_trainer / pi_sampler, cap), for a sampler whose log-probs differ from the trainer's
  # (rl_sampling.dtype='bfloat16' with a float32 policy); verl and TRL use cap 2. 0 = off.
  tis_cap: float = 0.0
  # Off-policy steps (several epochs or minibatches): the old log-probs are the sampler's
  # (`Rollout.logprobs`), not a policy forward in `make_experience`, as in TRL's PPOTrainer and
  # verl without recompute. They equal the recomputed ones up to float rounding when the sampler
  # computes in the policy's dtype (a bf16 sampler: leave off, use `tis_cap`). The `entropy` metric
  # then comes from the update's forwards. Off: the policy forward runs (the default).
  sampler_logprobs: bool = False
  # The update with each built-in trunk split per layer (its parameters and AdamW moments, for the
  # whole update; `models.transformer.map_trunks`) and the losses' last layer run on the columns
  # that predict response tokens only (`Trunk`'s `out_from`); unpacked rows only (packed ones keep
  # the scan). Same values to 1e-5; ~10 % off the 4-layer PPO peer workload's update on XLA:CPU.
  # Costs a second copy of the train state during the update and a compile that unrolls the
  # layers, and the gain shrinks as 1 / n_layers: off by default. Needs an optimizer whose state
  # mirrors the parameters leaf for leaf with a layout-blind mask (the built-in AdamW,
  # `train.state.decay_mask`; not a fixed mask tree, multi_transform labels or Adafactor).
  per_layer_update: bool = False

  def __post_init__(self):
    if self.algo not in ALGOS:
      raise ValueError(f"rl.algo must be one of {ALGOS}, got {self.algo!r}")
    for name, least in (("group_size", 1), ("epochs", 1), ("minibatch_size", 1), ("microbatch_size", 0),
                        ("clip_eps_high", 0), ("value_clip", 0), ("kl_coef", 0), ("vf_coef", 0)):
      if getattr(self, name) < least:
        raise ValueError(f"rl.{name} must be >= {least}, got {getattr(self, name)}")
    if self.clip_eps <= 0:
      raise ValueError(f"rl.clip_eps must be > 0, got {self.clip_eps}")
    if self.dual_clip and self.dual_clip <= 1:
      raise ValueError(f"rl.dual_clip must be > 1 (0 = off), got {self.dual_clip}")
    for name in ("gamma", "lam"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"rl.{name} must be in [0, 1], got {getattr(self, name)}")
    if self.kl_estimator not in rl.kl.KL_KINDS:
      raise ValueError(f"rl.kl_estimator must be one of {rl.kl.KL_KINDS}, got {self.kl_estimator!r}")
    if self.aggregation not in rl.losses.AGGREGATIONS:
      raise ValueError(f"rl.aggregation must be one of {rl.losses.AGGREGATIONS}, got {self.aggregation!r}")
    if self.advantage_scale not in ("group", "batch", "none"):
      raise ValueError(f"rl.advantage_scale must be group|batch|none, got {self.advantage_scale!r}")
    if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
      raise ValueError(f"rl.adaptive_kl needs rl.kl_target > 0 and rl.kl_horizon > 0, got "
                       f"{self.kl_target} and {self.kl_horizon}")
    if self.algo == "best_of_n" and not 1 <= 2 * self.best_of_n_k <= self.group_size:
      raise ValueError(f"rl.best_of_n_k must be in [1, rl.group_size // 2 = {self.group_size // 2}], "
                       f"got {self.best_of_n_k}")
    if self.kl_mode not in ("auto", "reward", "loss", "none"):
      raise ValueError(f"rl.kl_mode must be auto|reward|loss|none, got {self.kl_mode!r}")
    if self.algo in ("grpo", "rloo", "best_of_n") and self.group_size < 2:
      raise ValueError(f"{self.algo} needs rl.group_size >= 2, got {self.group_size}")
    if self.shared_trunk and not self.has_critic:
      raise ValueError(f"rl.shared_trunk needs a critic (rl.algo='ppo'), got rl.algo={self.algo!r}")
    if self.microbatch_size and self.minibatch_size % self.microbatch_size:
      raise ValueError(f"rl.minibatch_size={self.minibatch_size} is not a multiple of "
                       f"rl.microbatch_size={self.microbatch_size}")
    if self.pack and self.share_prompt:
      raise ValueError("rl.pack and rl.share_prompt are two packings of the rollout: set one")
    if self.packs and self.microbatch_size:
      raise ValueError(f"rl.{'pack' if self.pack else 'share_prompt'} packs the whole minibatch: it "
                       f"needs rl.microbatch_size=0")
    if self.tis_cap < 0:
      raise ValueError(f"rl.tis_cap must be >= 0 (0 = off), got {self.tis_cap}")
    if self.sampler_logprobs and self.shared_trunk:
      raise ValueError("rl.sampler_logprobs skips the policy forward of make_experience, which "
                       "rl.shared_trunk needs for its values: set one")
    if self.sampler_logprobs and self.tis_cap:
      raise ValueError("rl.tis_cap corrects the sampler's log-probs against recomputed ones; with "
                       "rl.sampler_logprobs none are recomputed: set one")
    if self.share_prompt and self.group_size < 2:
      raise ValueError(f"rl.share_prompt shares a group's prompt: it needs rl.group_size >= 2, got "
                       f"{self.group_size}")

  @property
  def packs(self) -> bool:
    """The rollout is packed (`rl.pack` or `rl.share_prompt`): experience carries a `Packing`."""
    return self.pack or self.share_prompt

  @property
  def has_critic(self) -> bool:
    return self.algo == "ppo"

  @property
  def separate_critic(self) -> bool:
    """A critic with its own parameters and optimizer (PPO without `shared_trunk`)."""
    return self.has_critic and not self.shared_trunk

  @property
  def uses_reference(self) -> bool:
    """Whether the reference's log-probs can change the update (else its forward is skipped)."""
    return self.kl_placement != "none" and bool(self.kl_coef or self.adaptive_kl)

  def on_policy(self, batch: int) -> bool:
    """Whether the behaviour log-probs of a `batch`-row rollout are the update's own, under
    `stop_gradient` (TRL and Tunix at mu = 1): one epoch over one minibatch updates from the
    sampler's parameters, and nothing before the update reads the log-probs (no KL in the reward,
    no shared-trunk values), so `make_experience` skips the policy forward."""
    return (self.reuse_logprobs and self.epochs == 1 and self.minibatch_size == batch
            and not self.shared_trunk and not (self.kl_placement == "reward" and self.uses_reference))

  @property
  def kl_placement(self) -> str:
    if self.kl_mode != "auto":
      return self.kl_mode
    return "loss" if self.algo in ("grpo", "best_of_n") else "reward"

  def kl_controller(self):
    if self.adaptive_kl:
      return rl.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
    return rl.FixedKLController(self.kl_coef)


@dataclasses.dataclass(frozen=True)
class RLOptimConfig:
  """The RL optimizers (`config.rl_optim`): AdamW at a constant rate after warmup."""

  learning_rate: float = 1e-4  # policy AdamW lr
  value_learning_rate: float = 1e-4  # critic AdamW lr (PPO)
  warmup_steps: int = 5  # optimizer steps of linear warmup
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # global-norm clip

  def __post_init__(self):
    for name in ("learning_rate", "value_learning_rate", "warmup_steps", "weight_decay", "grad_clip"):
      if getattr(self, name) < 0:
        raise ValueError(f"rl_optim.{name} must be >= 0, got {getattr(self, name)}")

  def optim(self, value: bool = False) -> OptimConfig:
    return OptimConfig(learning_rate=self.value_learning_rate if value else self.learning_rate,
                       warmup_steps=self.warmup_steps, min_lr_ratio=1.0,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip)

  def optimizers(self, total_steps: int):
    """(policy tx, value tx) for `total_steps` optimizer steps."""
    return (make_optimizer(self.optim(), total_steps),
            make_optimizer(self.optim(value=True), total_steps))


@dataclasses.dataclass(frozen=True)
class RLModels:
  """The modules the RL core applies (static, hashable; see `rlhfjax.models.sequence`).

  `policy` samples, scores the reference and (without an actor-critic) computes the loss; `critic`
  is PPO's separate value model; `actor_critic`, for PPO with one shared trunk, gives log-probs and
  values from one forward, its parameters the policy's plus a value head.
  """

  policy: nn.Module
  critic: nn.Module | None = None
  actor_critic: nn.Module | None = None

  def check(self, algo: AlgoConfig) -> "RLModels":
    if algo.separate_critic and self.critic is None:
      raise ValueError("rl.algo='ppo' needs a critic module (RLModels.critic)")
    if algo.shared_trunk and self.actor_critic is None:
      raise ValueError("rl.shared_trunk needs an actor-critic module (RLModels.actor_critic)")
    return self

  def trained_policy(self, algo: AlgoConfig) -> nn.Module:
    """The module the policy's own train state is initialized from."""
    return self.actor_critic if algo.shared_trunk else self.policy


@flax.struct.dataclass
class RLState:
  policy: TrainState  # with `shared_trunk`, params also hold the value head (`PolicyValueModel`)
  value: Any  # TrainState of a separate critic, or None (critic-free or shared trunk)
  kl: rl.KLState
  iteration: jax.Array


@flax.struct.dataclass
class Experience:
  """One rollout batch, all [B, ...] device arrays (B = prompts x group size)."""

  prompt_ids: jax.Array  # [B, P]
  prompt_mask: jax.Array  # [B, P]
  response_ids: jax.Array  # [B, N]
  response_mask: jax.Array  # [B, N] float32
  old_logprobs: jax.Array  # [B, N] behaviour policy (recomputed; the sampler's with `rl.sampler_logprobs`; 0 when `algo.on_policy(B)`)
  ref_logprobs: jax.Array  # [B, N] frozen reference
  old_values: jax.Array  # [B, N] critic at collection (0 without a critic)
  advantages: jax.Array  # [B, N]
  returns: jax.Array  # [B, N] critic targets (0 without a critic)
  sampler_logprobs: jax.Array  # [B, N] the sampler's log-probs with `rl.tis_cap`, or `rl.sampler_logprobs` off-policy (else 0)
  packing: Packing | None = None  # with `rl.pack` / `rl.share_prompt`: the rollout's packed rows (replicated; not batch-split)


EXPERIENCE_FIELDS = tuple(f.name for f in dataclasses.fields(Experience) if f.name != "packing")


def rl_state_shardings(models: RLModels, algo: AlgoConfig, policy_tx, value_tx, mesh, rules):
  """(abstract RLState, its NamedSharding tree), computed abstractly (nothing is allocated)."""
  p_abs, p_sh = state_shardings(models.trained_policy(algo), policy_tx, mesh, rules)
  v_abs, v_sh = (None, None)
  if algo.separate_critic:
    v_abs, v_sh = state_shardings(models.critic, value_tx, mesh, rules)
  kl = algo.kl_controller().init()
  rep = replicated(mesh)
  abstract = RLState(policy=p_abs, value=v_abs, kl=jax.eval_shape(lambda: kl),
                     iteration=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = RLState(policy=p_sh, value=v_sh, kl=jax.tree.map(lambda _: rep, kl), iteration=rep)
  return abstract, shardings


def init_rl_state(models: RLModels, algo: AlgoConfig, policy_tx, value_tx, mesh, rules, rng,
                  policy_params, value_init_params=None) -> RLState:
  """A sharded RLState: the policy from `policy_params` (e.g. SFT); PPO's separate critic fresh
  (its output layer zero), its `trunk` from `value_init_params` when given (RM or SFT).

  With `algo.shared_trunk` the policy's parameters gain the actor-critic's freshly initialized
  value head (unless they have one) and `value_init_params` is unused.
  """
  models.check(algo)
  if algo.shared_trunk and "value_head" not in policy_params:
    fresh, _ = create_train_state(models.actor_critic, policy_tx, rng, mesh, rules)
    policy_params = {**policy_params, "value_head": fresh.params["value_head"]}
  policy, _ = create_train_state(models.trained_policy(algo), policy_tx, rng, mesh, rules,
                                 params=policy_params)
  value = None
  if algo.separate_critic:
    vrng = jax.random.fold_in(rng, 1)
    fresh, _ = create_train_state(models.critic, value_tx, vrng, mesh, rules)
    vparams = fresh.params
    if value_init_params is not None:
      vparams = transplant_trunk(vparams, value_init_params)
    value, _ = create_train_state(models.critic, value_tx, vrng, mesh, rules, params=vparams)
  # Scalars placed replicated on the mesh, as `rl_update` returns them: an uncommitted scalar
  # here would make the first and second iterations compile the update twice.
  rep = replicated(mesh)
  return RLState(policy=policy, value=value, kl=jax.device_put(algo.kl_controller().init(), rep),
                 iteration=jax.device_put(jnp.zeros((), jnp.int32), rep))


def last_token_onehot(mask):
  """1.0 at each row's last masked column: [B, N] -> [B, N]."""
  n = mask.shape[1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(n), -1), axis=1)
  return (jnp.arange(n)[None] == last[:, None]).astype(jnp.float32)


def shared_prompt_band(algo: AlgoConfig, batch):
  """`attention_band` for `batch`'s (a Rollout's or Experience's) shared-prompt rows with
  `algo.share_prompt` (the group's prompt in the first P - 1 slots, each response's own tokens
  within N - 1 slots of each other), else a context that does nothing."""
  if not algo.share_prompt:
    return contextlib.nullcontext()
  return attention_band(batch.prompt_ids.shape[1] - 1, batch.response_ids.shape[1] - 1)


@flax.struct.dataclass
class Forwards:
  """What `make_experience` computes before it reads the scores: [B, N] float32 arrays (0 where the
  rollout's response mask is 0, but for `entropy`), or None where not computed."""

  logprobs: Any = None  # behaviour log-probs (None: on-policy, or `rl.sampler_logprobs`)
  entropy: Any = None  # their entropy (None without `logprobs`)
  ref_logprobs: Any = None  # reference log-probs (None: no KL term can matter)
  values: Any = None  # the critic's or the shared trunk's values (None without a critic)


def make_experience(policy_params, ref_params, value_params, rollout: Rollout, scores, kl_coef, *,
                    algo: AlgoConfig, models: RLModels, temperature: float = 1.0):
  """(Experience, scalar metrics) of one `Rollout` with [B] `scores` and the current beta `kl_coef`:
  log-probs (at the sampler's `temperature`), reference log-probs, values, rewards, advantages.
  `experience_from_forwards(experience_forwards(...), ...)`: the forwards need no scores, so a loop
  can run them while the host scores (`make_experience_fns`).

  `value_params` is the separate critic's (PPO only; with `shared_trunk` the values come from
  `policy_params`' value head in the same forward as the log-probs).

  When `algo.on_policy(B)` the policy forward is skipped: `old_logprobs` are zeros (the update
  reads its own), and the `kl_seq_mean` / `entropy` metrics come from the update. Otherwise, with
  `algo.sampler_logprobs`, it is skipped too: `old_logprobs` are the rollout's, and `entropy`
  comes from the update.
  """
  fwd = experience_forwards(policy_params, ref_params, value_params, rollout, algo=algo, models=models,
                            temperature=temperature)
  return experience_from_forwards(fwd, rollout, scores, kl_coef, algo=algo)


def experience_forwards(policy_params, ref_params, value_params, rollout: Rollout, *, algo: AlgoConfig,
                        models: RLModels, temperature: float = 1.0) -> Forwards:
  """The model forwards of `make_experience` (`Forwards`): they read the rollout, not its scores."""
  with shared_prompt_band(algo, rollout):
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids)
    mask = rollout.response_mask.astype(jnp.float32)
    fwd = Forwards()
    if not algo.on_policy(mask.shape[0]) and not algo.sampler_logprobs:
      model = models.actor_critic if algo.shared_trunk else models.policy
      logprobs, entropy, shared = response_token_stats(policy_params, model, *args, mask, temperature,
                                                       values=algo.shared_trunk, packing=rollout.packing)
      fwd = fwd.replace(logprobs=logprobs * mask, entropy=entropy,
                        values=shared * mask if algo.shared_trunk else None)
    if algo.uses_reference:  # without a KL term the reference cannot matter: its forward is skipped
      fwd = fwd.replace(ref_logprobs=response_token_stats(
          ref_params, models.policy, *args, mask, temperature, entropy=False, packing=rollout.packing)[0] * mask)
    if algo.separate_critic:
      fwd = fwd.replace(values=response_values(value_params, models.critic, *args, mask,
                                               rollout.packing) * mask)
    return fwd


def experience_from_forwards(fwd: Forwards, rollout: Rollout, scores, kl_coef, *, algo: AlgoConfig):
  """(Experience, scalar metrics) of `make_experience` from its `Forwards` and the [B] `scores`.
  `rollout.response_mask` may be narrower than the forwards' (rows masked after scoring)."""
  mask = rollout.response_mask.astype(jnp.float32)
  on_policy = algo.on_policy(mask.shape[0])
  zeros = jnp.zeros_like(mask)
  sampler_logprobs = zeros
  if algo.tis_cap or (algo.sampler_logprobs and not on_policy):
    if rollout.logprobs is None:
      raise ValueError(f"rl.{'tis_cap' if algo.tis_cap else 'sampler_logprobs'} needs the sampler's "
                       f"log-probs: a Rollout with `logprobs` (Rollout.from_sample keeps them)")
    sampler_logprobs = rollout.logprobs.astype(jnp.float32) * mask
  recompute = fwd.logprobs is not None
  logprobs = fwd.logprobs * mask if recompute else sampler_logprobs if algo.sampler_logprobs else zeros
  ref_logprobs = logprobs if fwd.ref_logprobs is None else fwd.ref_logprobs * mask
  # on-policy, the KL is in the loss or nowhere: the reward's beta below is 0 and the update logs it
  kl = zeros if on_policy else rl.kl_estimate(logprobs, ref_logprobs, algo.kl_estimator) * mask
  seq_kl = kl.sum(axis=1)

  scores = scores.astype(jnp.float32)
  finished = rollout.finished.astype(jnp.float32)
  scores = scores + algo.missing_eos_penalty * (1.0 - finished)
  if algo.whiten_rewards:
    scores = scores / (jnp.std(scores) + 1e-8)
  beta = kl_coef if algo.kl_placement == "reward" else 0.0
  last = last_token_onehot(mask)
  token_rewards = scores[:, None] * last - beta * kl

  values, returns = zeros, zeros
  g = algo.group_size
  if algo.algo == "ppo":
    values = fwd.values * mask
    advantages, returns = rl.gae(token_rewards, values, mask, gamma=algo.gamma, lam=algo.lam)
    if algo.whiten_advantages:
      advantages = rl.whiten(advantages, mask)
  elif algo.algo == "grpo":
    seq = scores - beta * seq_kl
    advantages = rl.broadcast_sequence_advantage(
        rl.group_advantages(seq, g, scale=algo.advantage_scale), mask)
  elif algo.algo == "rloo":
    seq = scores - beta * seq_kl
    advantages = rl.broadcast_sequence_advantage(rl.rloo_advantages(seq, g), mask)
    if algo.whiten_advantages:
      advantages = rl.whiten(advantages, mask)
  elif algo.algo == "reinforce_pp":
    advantages = rl.reinforce_pp_advantages(token_rewards, mask, gamma=algo.gamma)
  else:  # best_of_n: top-k of each group +1, bottom-k -1 (ties broken by index)
    grouped = scores.reshape(-1, g)
    # Only a sample better than its group's worst is a positive, only one worse than its group's
    # best a negative: all-tied groups give no signal, and ties never cross the top-k/bottom-k line.
    above_min = (grouped > grouped.min(1, keepdims=True)).reshape(-1)
    below_max = (grouped < grouped.max(1, keepdims=True)).reshape(-1)
    sel = rl.best_of_n_select(scores, g, algo.best_of_n_k)
    advantages = rl.broadcast_sequence_advantage(
        jnp.where(sel > 0, sel * above_min, sel * below_max), mask)
  advantages = advantages * mask

  metrics = {
      "score_mean": scores.mean(), "score_std": scores.std(),
      "kl_coef": jnp.asarray(kl_coef, jnp.float32), "response_length": mask.sum(1).mean(),
      "eos_rate": finished.mean(), "advantage_mean": rl.masked_mean(advantages, mask),
      "advantage_abs_mean": rl.masked_mean(jnp.abs(advantages), mask),
  }
  if not on_policy:
    metrics["kl_seq_mean"] = seq_kl.mean()
  if recompute:  # else the update's forwards give it
    metrics["entropy"] = rl.masked_mean(fwd.entropy, mask)
  if algo.algo == "ppo":
    metrics["value_mean"] = rl.masked_mean(values, mask)
    metrics["return_mean"] = rl.masked_mean(returns, mask)
    metrics["explained_variance"] = rl.explained_variance(values, returns, mask)
  exp = Experience(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                   response_ids=rollout.response_ids, response_mask=mask,
                   old_logprobs=logprobs, ref_logprobs=ref_logprobs, old_values=values,
                   advantages=advantages, returns=returns, sampler_logprobs=sampler_logprobs,
                   packing=rollout.packing)
  return exp, metrics


def _units(mask, aggregation: str):
  """What `aggregation` divides by: masked tokens, non-empty sequences, or rows."""
  if aggregation == "token":
    return mask.sum()
  if aggregation == "sequence":
    return (mask.sum(axis=1) > 0).sum().astype(jnp.float32)
  return jnp.asarray(mask.shape[0], jnp.float32)


def policy_loss(params, mb: Experience, kl_coef, *, algo: AlgoConfig, models: RLModels,
                temperature: float = 1.0, on_policy: bool = False):
  """Clipped surrogate (+ k3 KL to the reference when KL is in the loss, − entropy bonus; with
  `algo.shared_trunk`, + `vf_coef` × the clipped value loss from the same forward).

  `on_policy` (`algo.on_policy`): the old log-probs are `stop_gradient` of this forward's, and the
  metrics carry the rollout's KL and entropy as sums per `_units` (`kl_sum_per_unit`,
  `entropy_sum_per_unit`), which the unit-weighted accumulation over micro-batches and devices
  turns into whole-batch sums per unit (`rl_update` reads them)."""
  mask = mb.response_mask
  logprobs, entropy, values = response_token_stats(
      params, models.actor_critic if algo.shared_trunk else models.policy, mb.prompt_ids,
      mb.prompt_mask, mb.response_ids, mask, temperature,
      entropy=bool(algo.entropy_coef) or on_policy or algo.sampler_logprobs, values=algo.shared_trunk,
      packing=mb.packing)
  old, ref = mb.old_logprobs, mb.ref_logprobs
  if on_policy:
    old = jax.lax.stop_gradient(logprobs) * mask
    ref = ref if algo.uses_reference else old
  agg = dict(aggregation=algo.aggregation, fixed_length=mask.shape[1])
  weights = None
  if algo.tis_cap:  # the trainer's behaviour log-probs against the sampler's
    weights = rl.truncated_is_weights(old, mb.sampler_logprobs, mask, algo.tis_cap)
  loss, metrics = rl.ppo_policy_loss(
      logprobs, old, mb.advantages, mask, clip_eps=algo.clip_eps,
      clip_eps_high=algo.clip_eps_high or None, dual_clip=algo.dual_clip or None, **agg,
      is_weights=weights)
  if algo.tis_cap:
    metrics["tis_weight_mean"] = rl.masked_mean(weights, mask)
    metrics["tis_capped_frac"] = rl.masked_mean((weights >= algo.tis_cap).astype(jnp.float32), mask)
  if on_policy:
    units = jnp.maximum(_units(mask, algo.aggregation), 1e-30)
    metrics["kl_sum_per_unit"] = (rl.kl_estimate(old, ref, "k1") * mask).sum() / units
    metrics["entropy_sum_per_unit"] = jax.lax.stop_gradient(entropy * mask).sum() / units
  elif algo.sampler_logprobs:  # no forward before the update measured it: per unit, as above
    units = jnp.maximum(_units(mask, algo.aggregation), 1e-30)
    metrics["entropy_sum_per_unit"] = jax.lax.stop_gradient(entropy * mask).sum() / units
    metrics["tokens_per_unit"] = mask.sum() / units
  if algo.kl_placement == "loss":
    kl = rl.kl_estimate(logprobs, ref, "k3")
    kl_loss = rl.aggregate_loss(kl, mask, **agg)
    loss = loss + kl_coef * kl_loss
    metrics["kl_loss"] = kl_loss
  if algo.entropy_coef:
    loss = loss - algo.entropy_coef * rl.aggregate_loss(entropy, mask, **agg)
  metrics["policy_loss"] = loss
  if algo.shared_trunk:
    vloss, vmetrics = _value_loss(values, mb, algo)
    loss = loss + algo.vf_coef * vloss
    metrics.update(vmetrics)
  return loss, metrics


def _value_loss(values, mb: Experience, algo: AlgoConfig):
  mask = mb.response_mask
  return rl.value_loss(values, mb.old_values, mb.returns, mask, clip=algo.value_clip or None,
                       aggregation=algo.aggregation, fixed_length=mask.shape[1])


def critic_loss(params, mb: Experience, *, algo: AlgoConfig, models: RLModels):
  mask = mb.response_mask
  values = response_values(params, models.critic, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mask,
                           mb.packing)
  return _value_loss(values, mb, algo)


def _accumulate(loss_fn, params, mb: Experience, n_micro: int, units_total, aggregation: str):
  """Gradient of the whole-minibatch loss as a weighted sum over micro-batches (lax.scan)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n_micro == 1:
    (_, metrics), grads = grad_fn(params, mb)
    return grads, metrics
  micro = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), mb)

  def body(acc, m):
    (_, metrics), grads = grad_fn(params, m)
    w = _units(m.response_mask, aggregation) / units_total
    acc = jax.tree.map(lambda a, g: (a + w * g).astype(a.dtype), acc, grads)  # bf16 params: bf16 grads
    return acc, (jax.tree.map(lambda x: w * x, metrics), metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (weighted, raw) = jax.lax.scan(body, zeros, micro)
  # unit-weighted sums, except extrema, which are the extremum over micro-batches
  return grads, {k: raw[k].max(0) if k.endswith("_max") else raw[k].min(0) if k.endswith("_min")
                 else v.sum(0) for k, v in weighted.items()}


def _apply(ts: TrainState, grads, tx):
  updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
  return ts.replace(step=ts.step + 1, params=optax.apply_updates(ts.params, updates),
                    opt_state=opt_state)


def minibatch_grads(state: RLState, mb: Experience, *, algo: AlgoConfig, models: RLModels,
                    temperature: float = 1.0, on_policy: bool = False):
  """(policy grads, value grads or None, metrics) of one minibatch."""
  n_micro = mb.response_ids.shape[0] // algo.microbatch_size if algo.microbatch_size else 1
  units = _units(mb.response_mask, algo.aggregation)
  pl = lambda p, m: policy_loss(p, m, state.kl.value, algo=algo, models=models,  # noqa: E731
                                temperature=temperature, on_policy=on_policy)
  pgrads, metrics = _accumulate(pl, state.policy.params, mb, n_micro, units, algo.aggregation)
  vgrads = None
  if algo.separate_critic:
    vl = lambda p, m: critic_loss(p, m, algo=algo, models=models)  # noqa: E731
    vgrads, vmetrics = _accumulate(vl, state.value.params, mb, n_micro, units, algo.aggregation)
    metrics.update(vmetrics)
  return pgrads, vgrads, metrics


def rl_update(state: RLState, exp: Experience, rng, *, algo: AlgoConfig, models: RLModels,
              policy_tx, value_tx, temperature: float = 1.0, grad_fn=None):
  """`epochs` x shuffled minibatches of clipped-surrogate updates, then one KL-controller step.
  A minibatch step whose loss or gradients are not finite is skipped (`update_skipped`: the share
  of skipped steps), as is the KL step on a non-finite KL: no host round-trip decides it.

  `grad_fn(state, minibatch, on_policy) -> (policy grads, value grads, metrics)` defaults to
  `minibatch_grads`; the shard_map data-parallel variant passes one that `psum`s over devices.
  With `algo.on_policy(B)` the old log-probs are the update's own and so are the KL the
  controller steps on and the `kl_seq_mean` / `entropy` metrics.
  """
  with shared_prompt_band(algo, exp):
    return _rl_update(state, exp, rng, algo=algo, models=models, policy_tx=policy_tx,
                      value_tx=value_tx, temperature=temperature, grad_fn=grad_fn)


def _rl_update(state: RLState, exp: Experience, rng, *, algo: AlgoConfig, models: RLModels,
               policy_tx, value_tx, temperature: float = 1.0, grad_fn=None):
  grad_fn = grad_fn or (lambda s, mb, on_policy: minibatch_grads(
      s, mb, algo=algo, models=models, temperature=temperature, on_policy=on_policy))
  b = exp.response_ids.shape[0]
  if b % algo.minibatch_size:
    raise ValueError(f"rollout batch {b} (prompts_per_iter x group_size) is not a multiple of "
                     f"rl.minibatch_size={algo.minibatch_size}")
  n_mb = b // algo.minibatch_size
  on_policy = algo.on_policy(b)
  if exp.packing is not None and n_mb != 1:
    raise ValueError(f"a packed rollout (rl.pack, rl.share_prompt) needs one minibatch per step: rl.minibatch_size={algo.minibatch_size} "
                     f"!= the rollout batch {b}")

  def minibatch_step(s: RLState, mb: Experience):
    pgrads, vgrads, metrics = grad_fn(s, mb, on_policy)
    if "tokens_per_unit" in metrics:  # `rl.sampler_logprobs`: the minibatch's entropy per token
      tokens = metrics.pop("tokens_per_unit")
      metrics["entropy"] = metrics.pop("entropy_sum_per_unit") / jnp.where(tokens > 0, tokens, 1.0)
    metrics["policy_grad_norm"] = optax.tree.norm(pgrads)
    if algo.separate_critic:
      metrics["value_grad_norm"] = optax.tree.norm(vgrads)
    # a non-finite loss or gradient skips the step: parameters and optimizer state as they were.
    # `lax.cond`, not a `where` over the new and old state: that kept both and copied every
    # parameter and moment each step (the PPO update ran ~5 % slower on the 2-core CPU).
    ok = jnp.all(jnp.isfinite(jnp.stack([metrics[k] for k in ("policy_loss", "policy_grad_norm",
                                                             "value_grad_norm") if k in metrics])))

    def step(s: RLState) -> RLState:
      value = _apply(s.value, vgrads, value_tx) if algo.separate_critic else s.value
      return s.replace(policy=_apply(s.policy, pgrads, policy_tx), value=value)

    metrics["update_skipped"] = 1.0 - ok.astype(jnp.float32)
    return jax.lax.cond(ok, step, lambda s: s, s), metrics

  # `rl.per_layer_update` (unpacked rows): the losses run the last layer only on the columns
  # predicting response tokens (`Trunk`'s `out_from`), which pays with one tree per layer
  # (`unstack_layers`): parameters and optimizer moments are laid out so for the whole update
  # (a custom `grad_fn` sees that state) and stacked back after
  per_layer = algo.per_layer_update and exp.packing is None
  if per_layer:
    state = map_trunks(unstack_layers, state)

  def epoch(s: RLState, key):
    if n_mb == 1:  # one minibatch: the loss does not depend on the row order (and packing needs it)
      packing = jax.tree.map(lambda x: x[None], exp.packing)  # replicated, not batch-split
      whole = jax.tree.map(lambda x: nn.with_logical_constraint(x[None], (None, ax.BATCH)),
                           exp.replace(packing=None))
      return jax.lax.scan(minibatch_step, s, whole.replace(packing=packing))
    perm = jax.random.permutation(key, b)
    # minibatches split over the batch axes (under `make_rl_update`'s layout), not replicated
    shuffled = jax.tree.map(lambda x: nn.with_logical_constraint(
        x[perm].reshape(n_mb, algo.minibatch_size, *x.shape[1:]), (None, ax.BATCH)), exp)
    return jax.lax.scan(minibatch_step, s, shuffled)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, algo.epochs))
  if per_layer:
    state = map_trunks(stack_layers, state)
  metrics = jax.tree.map(jnp.mean, metrics)
  if on_policy:  # one minibatch: its per-unit sums times its units are the rollout's sums
    units = _units(exp.response_mask, algo.aggregation)
    metrics["kl_seq_mean"] = seq_kl = metrics.pop("kl_sum_per_unit") * units / b
    tokens = exp.response_mask.sum()
    metrics["entropy"] = metrics.pop("entropy_sum_per_unit") * units / jnp.where(tokens > 0, tokens, 1.0)
  else:
    seq_kl = rl.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k1").sum(1).mean()
  kl_state = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(seq_kl), new, old),
                          algo.kl_controller().update(state.kl, seq_kl, b), state.kl)
  return state.replace(kl=kl_state, iteration=state.iteration + 1), metrics


def traced_in_layout(fn, mesh, rules):
  """`fn` traced under `mesh` and the logical `rules` (`sampling.layout`), so the logical
  constraints in it (the model's batch-split activations, the update's minibatches) take effect."""
  def traced(*args):
    with layout(mesh, rules):
      return fn(*args)
  return traced


@jax.jit
def _response_width(mask):
  return jnp.max(jnp.where(mask.any(0), jnp.arange(1, mask.shape[1] + 1), 0))


def trim_rollout(rollout: Rollout, algo: AlgoConfig) -> Rollout:
  """`rollout` with its response axis cut to the longest response rounded up to the next of
  `width_buckets` (16, 24, 32, 48, 64, ...: at most a third of the columns padding), so later
  forwards skip the padding and only a few widths are ever compiled (one scalar comes to the host,
  the same on every process). Aggregation "fixed" divides by the width: it keeps the full one."""
  n = rollout.response_ids.shape[1]
  width = bucket_width(int(_response_width(rollout.response_mask)), n)
  if algo.aggregation == "fixed" or width == n:
    return rollout
  return cut_responses(rollout, width)


def cut_responses(rollout: Rollout, width: int) -> Rollout:
  """`rollout` with its [B, N] response arrays (ids, mask, the sampler's log-probs) cut to `width`."""
  return rollout.replace(response_ids=rollout.response_ids[:, :width],
                         response_mask=rollout.response_mask[:, :width],
                         logprobs=None if rollout.logprobs is None else rollout.logprobs[:, :width])


def experience_shardings(mesh, rules, packed: bool = False):
  packing = Packing(src=replicated(mesh), dst=replicated(mesh), segments=replicated(mesh)) if packed else None
  return Experience(**{k: batch_sharding(mesh, 2, rules) for k in EXPERIENCE_FIELDS}, packing=packing)


def pack_rollout(rollout: Rollout, algo: AlgoConfig, mesh, rules) -> Rollout:
  """With `algo.pack`, `rollout` with its `Packing` (first-fit decreasing into rows of P + N slots,
  the row count a multiple of the batch shards; two [B] length vectors come to the host, the same
  on every process); with `algo.share_prompt`, one row per group with its prompt once
  (`share_lengths`; raises ValueError if a group's rows have different prompts); else
  `trim_rollout(rollout, algo)`."""
  if not algo.packs:
    return trim_rollout(rollout, algo)
  (b, p), n = rollout.prompt_ids.shape, rollout.response_ids.shape[1]
  group = algo.group_size if algo.share_prompt else 1
  lengths, shared = jax.device_get(_lengths(mesh, group)(rollout.prompt_ids, rollout.prompt_mask,
                                                         rollout.response_mask))  # one transfer
  pl, rl_ = np.asarray(lengths)
  if algo.share_prompt:
    if not bool(shared):
      raise ValueError(f"rl.share_prompt: the rollout's groups of {algo.group_size} consecutive rows "
                       f"do not each share one prompt")
    plan = share_lengths(pl, rl_, p, n, algo.group_size, batch_shards(b, mesh, rules))
  else:
    plan = pack_lengths(pl, rl_, p, n, batch_shards(b, mesh, rules))
  return rollout.replace(packing=jax.device_put(plan, replicated(mesh)))


def batch_shards(b: int, mesh, rules) -> int:
  """How many pieces the batch axis of a `b`-row batch is split into on `mesh`."""
  return b // batch_sharding(mesh, 2, rules).shard_shape((b, 1))[0]


@functools.lru_cache(maxsize=None)
def _lengths(mesh, group: int = 1):
  """Jitted (prompt, response) lengths [2, B] and whether each `group` consecutive rows have one
  prompt (ids and mask; True for group 1), replicated on `mesh`: readable on every process."""
  def lengths(ids, pm, rm):
    same = lambda x: jnp.all(x.reshape(-1, group, x.shape[1]) == x[::group][:, None])  # noqa: E731
    return jnp.stack([(pm > 0).sum(1), (rm > 0).sum(1)]), same(ids * (pm > 0)) & same(pm > 0)
  return jax.jit(lengths, out_shardings=replicated(mesh))


def make_rl_update(algo: AlgoConfig, models: RLModels, policy_tx, value_tx, shardings, mesh, rules,
                   *, temperature: float = 1.0, grad_fn=None):
  """`jax.jit` of `rl_update` with explicit shardings; the state is donated. `grad_fn` replaces
  the per-minibatch gradient (the shard_map variant, `rl_shard_map.shard_map_grad_fn`)."""
  fn = lambda s, e, r: rl_update(s, e, r, algo=algo, models=models, policy_tx=policy_tx,  # noqa: E731
                                 value_tx=value_tx, temperature=temperature, grad_fn=grad_fn)
  fn = fn if grad_fn else traced_in_layout(fn, mesh, rules)  # shard_map bodies see local shapes
  return jax.jit(fn, in_shardings=(shardings, experience_shardings(mesh, rules, algo.packs),
                                   replicated(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_experience_fn(algo: AlgoConfig, models: RLModels, mesh, rules, *, temperature: float = 1.0):
  """`jax.jit` of `make_experience`; experience comes out batch-sharded."""
  fn = lambda p, r, v, roll, s, k: make_experience(p, r, v, roll, s, k, algo=algo,  # noqa: E731
                                                   models=models, temperature=temperature)
  return jax.jit(traced_in_layout(fn, mesh, rules),
                 out_shardings=(experience_shardings(mesh, rules, algo.packs), replicated(mesh)))


def make_experience_fns(algo: AlgoConfig, models: RLModels, mesh, rules, *, temperature: float = 1.0):
  """`(forwards, finish)`: `jax.jit`s of `experience_forwards` and `experience_from_forwards`;
  `finish(forwards(p, r, v, roll), roll, s, k)` is `make_experience_fn(...)(p, r, v, roll, s, k)`.
  Called before the scoring, `forwards` runs on the devices while the host scores (dispatch is
  asynchronous); experience comes out batch-sharded."""
  fwd = lambda p, r, v, roll: experience_forwards(p, r, v, roll, algo=algo, models=models,  # noqa: E731
                                                  temperature=temperature)
  fin = lambda f, roll, s, k: experience_from_forwards(f, roll, s, k, algo=algo)  # noqa: E731
  return (jax.jit(traced_in_layout(fwd, mesh, rules), out_shardings=batch_sharding(mesh, 2, rules)),
          jax.jit(traced_in_layout(fin, mesh, rules),
                  out_shardings=(experience_shardings(mesh, rules, algo.packs), replicated(mesh))))
