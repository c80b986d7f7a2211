"""Rewards: the reward-function contract, math/format verifiers, and the code sandbox."""
from rlhfjax.rewards.base import NAN_POLICIES
from rlhfjax.rewards.base import RewardFn
from rlhfjax.rewards.base import combine_rewards
from rlhfjax.rewards.base import get_reward_fn
from rlhfjax.rewards.base import list_reward_fns
from rlhfjax.rewards.base import register_reward
from rlhfjax.rewards.format import format_reward
from rlhfjax.rewards.format import format_reward_fn
from rlhfjax.rewards.format import is_well_formed
from rlhfjax.rewards.format import split_thinking
from rlhfjax.rewards.format import thinking_stats
from rlhfjax.rewards.math import answers_match
from rlhfjax.rewards.math import extract_answer
from rlhfjax.rewards.math import math_reward
from rlhfjax.rewards.math import math_reward_fn
from rlhfjax.rewards.sandbox import STATUSES
from rlhfjax.rewards.sandbox import CodeResult
from rlhfjax.rewards.sandbox import CodeSandboxPool
from rlhfjax.rewards.sandbox import code_reward_fn
from rlhfjax.rewards.sandbox import extract_code
from rlhfjax.rewards.sandbox import run_code_tests

__all__ = [
    "NAN_POLICIES", "RewardFn", "combine_rewards", "get_reward_fn", "list_reward_fns", "register_reward",
    "format_reward", "format_reward_fn", "is_well_formed", "split_thinking", "thinking_stats",
    "answers_match", "extract_answer", "math_reward", "math_reward_fn",
    "STATUSES", "CodeResult", "CodeSandboxPool", "code_reward_fn", "extract_code", "run_code_tests",
]
