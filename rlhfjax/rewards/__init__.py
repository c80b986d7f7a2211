"""Rewards: the reward-function contract, math/format verifiers, and the code sandbox."""
from rlhfjax.rewards.base import (NAN_POLICIES, RewardFn, combine_rewards, get_reward_fn, list_reward_fns,
                                  register_reward)
from rlhfjax.rewards.format import (format_reward, format_reward_fn, is_well_formed, split_thinking,
                                    thinking_stats)
from rlhfjax.rewards.math import answers_match, extract_answer, math_reward, math_reward_fn
from rlhfjax.rewards.sandbox import (STATUSES, CodeResult, CodeSandboxPool, code_reward_fn, extract_code,
                                     run_code_tests)

__all__ = [
    "NAN_POLICIES", "RewardFn", "combine_rewards", "get_reward_fn", "list_reward_fns", "register_reward",
    "format_reward", "format_reward_fn", "is_well_formed", "split_thinking", "thinking_stats",
    "answers_match", "extract_answer", "math_reward", "math_reward_fn",
    "STATUSES", "CodeResult", "CodeSandboxPool", "code_reward_fn", "extract_code", "run_code_tests",
]
