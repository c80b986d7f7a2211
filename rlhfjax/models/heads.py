"""Policy, value and reward models: the shared trunk plus one head each.

Parameter trees are `{"trunk": ..., <head params>}`, so any model can start from another's trunk
(`transplant_trunk`). They implement the interfaces of `rlhfjax.models.sequence`: `PolicyModel` a
policy (logits, KV cache), `ValueModel` a critic, `PolicyValueModel` an actor-critic; `RewardModel`
scores sequences.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfjax.models.transformer import Trunk, TransformerConfig, init_cache, linear, unstack_layers
from rlhfjax.parallel import axes as ax


class _LM(nn.Module):
  """The trunk and the LM head (tied embedding or an `lm_head` param), as methods: `hidden` gives the
  final hidden states [B, T, D], `head` their next-token logits [B, T, vocab] (float32), so
  `rlhfjax.models.sequence` can run the head on a few positions at a time."""

  cfg: TransformerConfig
  # `hidden` and the no-cache `__call__` take `out_from` (`models.sequence`); a subclass whose
  # `__call__` does not must set it False
  takes_out_from = True

  def setup(self):
    cfg = self.cfg
    self.trunk = Trunk(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "normal"), (ax.EMBED, ax.VOCAB)),
                                (cfg.d_model, cfg.vocab_size), cfg.params_dtype)

  def hidden(self, tokens, positions, mask, out_from: int = 0):
    return self.trunk(tokens, positions, mask, out_from=out_from)[0]

  def head(self, h):
    if self.cfg.tie_embeddings:
      return self.trunk.attend(h)
    return linear("BTD,DV->BTV", h, self.lm_head.astype(h.dtype)).astype(jnp.float32)


class PolicyModel(_LM):
  """Language-model head: logits [B, T, vocab] (float32), and the KV cache when given one."""

  def __call__(self, tokens, positions, mask, cache=None, cache_index=0, out_from: int = 0):
    h, new_cache = self.trunk(tokens, positions, mask, cache, cache_index, out_from)
    return self.head(h), new_cache

  def init_cache(self, batch: int, length: int):
    """An empty KV cache of `length` slots (the sampler's; see `rlhfjax.models.transformer`)."""
    return init_cache(self.cfg, batch, length)

  def decode_params(self, params):
    """`params` laid out for the cached forward (per-layer weights, `unstack_layers`); the
    sampler converts once per call, outside its decode loop."""
    return {**params, "trunk": unstack_layers(params["trunk"])}

  @property
  def max_len(self) -> int:
    return self.cfg.max_len


def as_policy(model):
  """A policy module: `model` itself, or the built-in `PolicyModel` for a `TransformerConfig`."""
  return PolicyModel(model) if isinstance(model, TransformerConfig) else model


def _scalar_head(module: nn.Module, h, kernel_init):
  """A [D] -> scalar projection per token, computed in float32: [B, T, D] -> [B, T]."""
  w = module.param("head_kernel", nn.with_logical_partitioning(kernel_init, (ax.EMBED,)),
                   (h.shape[-1],), module.cfg.params_dtype)
  b = module.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                   module.cfg.params_dtype)
  return jnp.einsum("BTD,D->BT", h.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)


class ValueModel(nn.Module):
  """Critic: a scalar value per token [B, T]; the output layer starts at zero."""

  cfg: TransformerConfig
  takes_out_from = True

  @nn.compact
  def __call__(self, tokens, positions, mask, out_from: int = 0):
    h, _ = Trunk(self.cfg, name="trunk")(tokens, positions, mask, out_from=out_from)
    return _scalar_head(self, h, nn.initializers.zeros)


class _ValueHead(nn.Module):
  """The scalar value projection alone (a submodule, so its params sit under one name)."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, h):
    return _scalar_head(self, h, nn.initializers.zeros)


class PolicyValueModel(_LM):
  """Shared-trunk actor-critic: one trunk, the LM head and a value head -> (logits [B,T,V], values [B,T]).

  Its parameters are `PolicyModel`'s plus `value_head: {head_kernel, head_bias}`, so the sampler, the
  reference and `response_logits` apply `PolicyModel` to them unchanged (linen ignores the extra
  subtree), and one forward gives the PPO loss both the log-probs and the values (`values(h)`).
  """

  def setup(self):
    super().setup()
    self.value_head = _ValueHead(self.cfg)

  def __call__(self, tokens, positions, mask, out_from: int = 0):
    h = self.hidden(tokens, positions, mask, out_from)
    return self.head(h), self.values(h)

  def values(self, h):
    return self.value_head(h)


def last_token_index(mask: jax.Array) -> jax.Array:
  """Column of each row's last non-padding token: mask [B, T] -> [B] int32 (0 for empty rows)."""
  cols = jnp.arange(mask.shape[-1])
  return jnp.max(jnp.where(mask > 0, cols, 0), axis=-1).astype(jnp.int32)


POOLS = ("last", "sum", "mean")


class RewardModel(nn.Module):
  """Reward model: a score per sequence [B] (and with `per_token=True` the raw per-token outputs [B, T]).

  `pool` of the per-token head outputs over real tokens: "last" (the last one), "sum" (a per-token
  reward; the prompt's part cancels in comparisons) or "mean"; then `score = gain * pooled + bias`
  (params `norm_gain`, `norm_bias`, set after training to normalize scores).
  """

  cfg: TransformerConfig
  pool: str = "last"

  @nn.compact
  def __call__(self, tokens, positions, mask, per_token: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    h, _ = Trunk(self.cfg, name="trunk")(tokens, positions, mask)
    raw = _scalar_head(self, h, nn.initializers.normal(self.cfg.d_model ** -0.5))  # [B, T]
    gain = self.param("norm_gain", nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                      jnp.float32)
    bias = self.param("norm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                      jnp.float32)
    if self.pool == "last":
      pooled = jnp.take_along_axis(raw, last_token_index(mask)[:, None], axis=1)[:, 0]  # [B]
    else:
      m = mask.astype(jnp.float32)
      pooled = jnp.sum(raw * m, -1)
      if self.pool == "mean":
        pooled = pooled / jnp.maximum(m.sum(-1), 1.0)
    score = gain * pooled + bias
    return (score, raw) if per_token else score


def transplant_trunk(dst_params, src_params):
  """Return `dst_params` with its trunk replaced by `src_params`'s (heads kept)."""
  if "trunk" not in dst_params or "trunk" not in src_params:
    raise ValueError("both parameter trees need a 'trunk' subtree")
  out = dict(dst_params)
  out["trunk"] = src_params["trunk"]
  return out
