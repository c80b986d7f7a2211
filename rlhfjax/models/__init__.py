"""Transformer trunk, policy / value / reward heads and the KV cache."""

from rlhfjax.models.heads import (POOLS, PolicyModel, PolicyValueModel, RewardModel, ValueModel, as_policy,
                                  last_token_index, transplant_trunk)
from rlhfjax.models.transformer import TransformerConfig, Trunk, init_cache, rope
from rlhfjax.models.init import init_params, positions_from_mask
from rlhfjax.models.hf import load_hf, save_hf
