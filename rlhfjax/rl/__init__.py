"""Pure, jittable RL math: advantages, losses (policy gradient, value, DPO), KL estimators and
controllers, eval metrics."""

from rlhfjax.rl.advantages import best_of_n_select
from rlhfjax.rl.advantages import broadcast_sequence_advantage
from rlhfjax.rl.advantages import discounted_returns
from rlhfjax.rl.advantages import gae
from rlhfjax.rl.advantages import group_advantages
from rlhfjax.rl.advantages import reinforce_pp_advantages
from rlhfjax.rl.advantages import rloo_advantages
from rlhfjax.rl.dpo import dpo_loss
from rlhfjax.rl.kl import AdaptiveKLController
from rlhfjax.rl.kl import FixedKLController
from rlhfjax.rl.kl import KLState
from rlhfjax.rl.kl import kl_estimate
from rlhfjax.rl.losses import aggregate_loss
from rlhfjax.rl.losses import entropy_from_logits
from rlhfjax.rl.losses import explained_variance
from rlhfjax.rl.losses import logprobs_from_logits
from rlhfjax.rl.losses import ppo_policy_loss
from rlhfjax.rl.losses import truncated_is_weights
from rlhfjax.rl.losses import value_loss
from rlhfjax.rl.masked import masked_mean
from rlhfjax.rl.masked import masked_sum
from rlhfjax.rl.masked import masked_var
from rlhfjax.rl.masked import whiten
from rlhfjax.rl.metrics import maj_at_k
from rlhfjax.rl.metrics import pass_at_k

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLState",
    "aggregate_loss",
    "best_of_n_select",
    "broadcast_sequence_advantage",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "maj_at_k",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "pass_at_k",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "truncated_is_weights",
    "value_loss",
    "whiten",
]
