"""Decoder-only transformer trunk: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Inputs carry explicit `positions` and a key-validity `mask` because prompts are left-padded: row b's
first real token may sit at column 7, yet it is position 0. Attention is causal over *slots* (columns)
and ignores slots whose mask is 0.

The KV cache is a plain pytree `{"k": [layers, B, S, kv_heads, head_dim], "v": ...}`: a forward pass
with a cache writes its `T` new keys/values at slots `[cache_index, cache_index + T)` with
`lax.dynamic_update_slice` and attends over all `S` slots; `mask` is then `[B, S]`.

Layers are an `nn.scan` (one compiled layer body, parameters stacked on a leading `layers` axis).
Every parameter carries logical axis names (`rlhfjax.parallel.axes`) for sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfjax.parallel import axes as ax

Cache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static model hyper-parameters (hashable, safe as a jit static argument)."""

  vocab_size: int
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of n_kv_heads
  head_dim: int = 32
  d_ff: int = 512  # SwiGLU hidden width
  max_len: int = 128  # longest sequence (prompt + response) the model is built for
  rope_base: float = 10_000.0
  tie_embeddings: bool = True  # LM head = embedding transpose
  dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # storage dtype of parameters
  remat: bool = False  # rematerialize each layer in the backward pass (saves activation memory)
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self, with_embedding: bool = True) -> int:
    """Trunk parameter count (no heads), analytic."""
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    mlp = 3 * self.d_model * self.d_ff
    per_layer = attn + mlp + 2 * self.d_model
    emb = self.vocab_size * self.d_model if with_embedding else 0
    return self.n_layers * per_layer + self.d_model + emb

  def forward_flops_per_token(self, seq_len: int, lm_head: bool = True) -> float:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add), causal attention included."""
    flops = 2 * self.n_layers * (self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
                                 + 3 * self.d_model * self.d_ff)
    # QK^T and AV: each query attends to (on average) seq_len/2 keys under the causal mask.
    flops += 2 * 2 * self.n_layers * self.n_heads * self.head_dim * seq_len / 2
    if lm_head:
      flops += 2 * self.d_model * self.vocab_size
    return float(flops)


def _dense_init(axes: tuple[str, ...], scale: float = 1.0):
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(scale, "fan_in", "normal"), axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (ax.EMBED,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding (Su et al. 2021) on the last dim of x [B, T, N, H] at positions [B, T]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wq = self.param("wq", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, n, h), pdt)
    wk = self.param("wk", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, k, h), pdt)
    wv = self.param("wv", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, k, h), pdt)
    wo = self.param("wo", _dense_init((ax.HEADS, ax.KV, ax.EMBED)), (n, h, cfg.d_model), pdt)

    q = jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dt))  # [batch, time, heads, head_dim]
    kk = jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dt))  # [batch, time, kv_heads, head_dim]
    vv = jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dt))
    q, kk = rope(q, positions, cfg.rope_base), rope(kk, positions, cfg.rope_base)

    t = x.shape[1]
    if layer_cache is None:
      keys, values = kk, vv
      q_slot = jnp.arange(t)
      new_cache = None
    else:
      keys = jax.lax.dynamic_update_slice(layer_cache["k"], kk.astype(layer_cache["k"].dtype),
                                          (0, cache_index, 0, 0))
      values = jax.lax.dynamic_update_slice(layer_cache["v"], vv.astype(layer_cache["v"].dtype),
                                            (0, cache_index, 0, 0))
      q_slot = cache_index + jnp.arange(t)
      new_cache = {"k": keys, "v": values}
    s = keys.shape[1]
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & (mask[:, None, :] > 0)  # [B, T, S]

    q = q.reshape(q.shape[0], t, k, n // k, h)  # [batch, time, kv_heads, group, head_dim]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys.astype(dt)).astype(jnp.float32) * h ** -0.5
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values.astype(dt)).reshape(x.shape[0], t, n, h)
    return jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dt)), new_cache


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    w_gate = self.param("w_gate", _dense_init((ax.EMBED, ax.MLP)), (cfg.d_model, cfg.d_ff), pdt)
    w_up = self.param("w_up", _dense_init((ax.EMBED, ax.MLP)), (cfg.d_model, cfg.d_ff), pdt)
    w_down = self.param("w_down", _dense_init((ax.MLP, ax.EMBED)), (cfg.d_ff, cfg.d_model), pdt)
    gate = jnp.einsum("BTD,DF->BTF", x, w_gate.astype(dt))  # [batch, time, d_ff]
    up = jnp.einsum("BTD,DF->BTF", x, w_up.astype(dt))
    return jnp.einsum("BTF,FD->BTD", nn.silu(gate) * up, w_down.astype(dt))


class Block(nn.Module):
  """One pre-norm layer; the scan body. Carry: hidden states; per-layer input/output: its cache."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask, cache_index):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
    attn_out, new_cache = Attention(cfg, name="attn")(norm("attn_norm")(x), positions, mask,
                                                      layer_cache, cache_index)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
    return x, new_cache


class Trunk(nn.Module):
  """Embedding + scanned layers + final norm. Returns hidden states [B, T, D] and the new cache."""

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5), (ax.VOCAB, ax.EMBED)),
        (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: ax.LAYERS},
    )(cfg, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")

  def __call__(self, tokens, positions, mask, cache: Cache | None = None, cache_index=0):
    cfg = self.cfg
    # Gemma-style: small embedding init (tied logits start near N(0, 1)), inputs scaled by sqrt(d).
    x = jnp.take(self.embedding, tokens, axis=0) * jnp.sqrt(float(cfg.d_model))
    x = x.astype(cfg.compute_dtype)  # [batch, time, d_model]
    x, new_cache = self.layers(x, cache, positions, mask, cache_index)
    return self.final_norm(x), new_cache

  def attend(self, h):
    """Logits through the tied embedding: [B, T, D] -> [B, T, V] in f32."""
    return jnp.einsum("BTD,VD->BTV", h, self.embedding.astype(h.dtype)).astype(jnp.float32)


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache for `length` slots."""
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
