"""Decoder-only transformer trunk: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

The `TransformerConfig` switches cover the Hugging Face families `rlhfjax.models.hf` loads (Llama 3,
Qwen2/2.5, Qwen3, Gemma 3 text); their defaults are the original rlhfjax model, whose parameters and
outputs they leave exactly as they were.

Inputs carry explicit `positions` and a key-validity `mask` because prompts are left-padded: row b's
first real token may sit at column 7, yet it is position 0. Attention is causal over *slots* (columns)
and ignores slots whose mask is 0.

The KV cache is a plain pytree `{"k": (one [B, kv_heads, S, head_dim] array per layer), "v": ...}`:
a forward pass with a cache runs the layers unrolled over the scan's stacked parameters; each
writes its `T` new keys/values at slots `[cache_index, cache_index + T)` of its own arrays with
`lax.dynamic_update_slice` (in place in the sampler's `while_loop`) and attends over all `S` slots;
`mask` is then `[B, S]`. One array per layer because a layer's slice of one stacked cache was
copied out whole on every decode step (a dynamic slice feeding the attention dot).

Layers are an `nn.scan` (one compiled layer body, parameters stacked on a leading `layers` axis).
Every parameter carries logical axis names (`rlhfjax.parallel.axes`) for sharding.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.parallel import axes as ax

Cache = dict[str, tuple[jax.Array, ...]]  # {"k", "v"}: one [B, K, S, H] array per layer
# Hidden states split over the batch only, d_model whole, under a mesh + logical-rules context (the
# RL core's jitted functions trace in one; a no-op outside): GSPMD then gathers fsdp-sharded weights
# instead of keeping activations partly replicated.
ACTIVATIONS = (ax.BATCH, ax.LENGTH, None)


# `TransformerConfig.remat_policy`: what a rematerialized layer saves (`jax.checkpoint` policies)
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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
  # What a rematerialized layer keeps for the backward pass (`REMAT_POLICIES`): "full" nothing (the
  # layer's forward runs again); "dots" the outputs of its weight matmuls (projections, MLP), so only
  # norms, activations and attention are recomputed: on XLA:CPU the 4.2 M-parameter update's
  # gradient is ~8 % faster than without remat (fewer scan buffers to fill), at no matmul cost.
  remat_policy: str = "full"
  norm_eps: float = 1e-6
  # --- family switches (defaults: the original rlhfjax model; see rlhfjax/models/hf.py) ---
  embed_scale: bool = True  # inputs = embedding * sqrt(d_model), the constant rounded to the embedding's dtype (Gemma); False: Llama/Qwen
  norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w), w initialized at 0 (Gemma), instead of by w
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2; Llama/Qwen3/Gemma attention_bias)
  out_bias: bool = False  # bias on the attention output projection (Llama/Qwen3/Gemma attention_bias)
  qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before RoPE (Qwen3, Gemma 3)
  post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add (Gemma 3)
  mlp_activation: str = "silu"  # gate activation of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (Gemma)
  query_pre_attn_scalar: float | None = None  # attention logits * this ** -0.5 (Gemma); None: head_dim ** -0.5
  rope_scaling: str = "none"  # RoPE frequency scaling of global layers: "none", "linear" (/ factor), "llama3"
  rope_scaling_factor: float = 1.0  # "linear" and "llama3": the factor
  rope_low_freq_factor: float = 1.0  # "llama3": low_freq_factor
  rope_high_freq_factor: float = 4.0  # "llama3": high_freq_factor
  rope_original_max_len: int = 8192  # "llama3": original_max_position_embeddings
  layer_types: tuple[str, ...] = ()  # per layer "global" or "local" (sliding window); () = all global
  sliding_window: int = 0  # local layers: a query sees the keys less than this many slots back (itself included)
  rope_local_base: float | None = None  # RoPE base of local layers, unscaled (Gemma 3); None: as global layers
  # Attention without a cache (training, scoring): "einsum" (explicit scores) or "dot_product"
  # (`dot_product_attention`: cuDNN's fused kernel on GPU in bf16, XLA's elsewhere); decoding with
  # a cache always uses the einsum over the cache's own layout.
  attention: str = "einsum"

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    object.__setattr__(self, "layer_types", tuple(self.layer_types))  # lists (e.g. from JSON) stay hashable
    if self.layer_types and len(self.layer_types) != self.n_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
    if set(self.layer_types) - {"global", "local"}:
      raise ValueError(f"layer_types entries must be 'global' or 'local', got {self.layer_types}")
    if "local" in self.layer_types and self.sliding_window < 1:
      raise ValueError("local layers need sliding_window >= 1")
    if self.mlp_activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_activation must be 'silu' or 'gelu_tanh', got {self.mlp_activation!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.attention not in ("einsum", "dot_product"):
      raise ValueError(f"attention must be 'einsum' or 'dot_product', got {self.attention!r}")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"rope_scaling must be 'none', 'linear' or 'llama3', got {self.rope_scaling!r}")

  @property
  def has_local_layers(self) -> bool:
    return "local" in self.layer_types

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self, with_embedding: bool = True) -> int:
    """Trunk parameter count (no heads), analytic."""
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
    attn += self.d_model if self.out_bias else 0
    attn += 2 * self.head_dim if self.qk_norm else 0
    mlp = 3 * self.d_model * self.d_ff
    per_layer = attn + mlp + (4 if self.post_norms else 2) * self.d_model
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
  """x * rsqrt(mean(x^2) + eps) * w over the last dim, in float32; `plus_one`: * (1 + w) (Gemma)."""

  eps: float
  dtype: Any
  param_dtype: Any
  plus_one: bool = False
  axis_name: str = ax.EMBED  # logical name of the normalized dim

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = scale.astype(jnp.float32)
    if self.plus_one:
      w = 1.0 + w
    return (y * w).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float, freq: jax.Array | None = None) -> jax.Array:
  """Rotary embedding (Su et al. 2021) on the last dim of x [B, T, N, H] at positions [B, T].

  Dims `i` and `i + H/2` form a rotated pair (the "rotate_half" layout Hugging Face checkpoints use).
  `freq` [H/2] overrides the frequencies `base ** (-i / (H/2))` (see `rope_frequencies`).
  """
  half = x.shape[-1] // 2
  if freq is None:
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_frequencies(cfg: TransformerConfig, local: bool = False) -> jax.Array:
  """RoPE frequencies [head_dim/2] of a global (or, `local`, a sliding-window) layer, with scaling."""
  half = cfg.head_dim // 2
  if local and cfg.rope_local_base is not None:
    return cfg.rope_local_base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  freq = cfg.rope_base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    return freq / factor
  if cfg.rope_scaling == "llama3":
    # Llama 3.1: long wavelengths (> original_len / low_freq_factor) slowed down by `factor`, short ones
    # (< original_len / high_freq_factor) kept, a linear blend in the wavelength band between.
    lo, hi, old = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen = 2 * jnp.pi / freq
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * freq / factor + smooth * freq
    return jnp.where(wavelen < old / hi, freq, jnp.where(wavelen > old / lo, freq / factor, blended))
  return freq


SEGMENT_GROUP = 1 << 16  # a shared-prompt row's segment ids: group k's prompt k << 16, its responses above


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for a layer's activations `x` and weight `w`, with the weight
  gradient's operands ordered for the CPU backend.

  The weight gradient contracts the token axes. XLA's CPU dot wants the first operand's
  contracted axes minor, so it transposes that operand, and when that operand is an element-wise
  result fused into the transpose (a SwiGLU gradient, a stacked scan residual) the fused transpose
  runs ~10x slower than the dot. `jax.grad` of the plain einsum put the wide [tokens, d_ff]
  operand first (the update's backward pass ran ~9x its forward, mostly these transposes); here
  the smaller operand goes first. Same math; on GPU/TPU the order is immaterial.
  """
  return jnp.einsum(spec, x, w)


def _linear_fwd(spec, x, w):
  return jnp.einsum(spec, x, w), (x, w)


def _linear_bwd(spec, res, g):
  x, w = res
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  dx = jnp.einsum(f"{out},{ws}->{xs}", g, w)
  (a, sa), (b, sb) = ((x, xs), (g, out)) if x.size <= g.size else ((g, out), (x, xs))
  # jnp.einsum may swap its operands to suit the output order: fix the order, then transpose the
  # (small) weight gradient.
  order = "".join(c for c in sa + sb if c in ws)
  dw = jnp.einsum(f"{sa},{sb}->{order}", a, b, optimize=False)
  if order != ws and jax.default_backend() == "cpu":  # else XLA folds the transpose back into the
    # dot (operands swapped), which XLA:CPU runs outside YNN at ~half the rate (the SwiGLU down
    # projection's weight gradient: the MLP's fwd + bwd at 1080 rows ~4 % slower)
    dw = jax.lax.optimization_barrier(dw)
  dw = jnp.transpose(dw, [order.index(c) for c in ws])
  return dx.astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


_BAND: contextvars.ContextVar = contextvars.ContextVar("attention_band", default=None)
BAND_CHUNK = 16  # queries per chunk of `banded_attention`


@contextlib.contextmanager
def attention_band(prefix: int, window: int):
  """Within it, a no-cache forward of the built-in attention (at trace time) assumes every key a
  query at slot s >= `prefix` may see lies in the first `prefix` slots or in [s - `window`, s], and
  a query below `prefix` sees keys below it only, as in a shared-prompt row
  (`models.sequence.share_lengths`: the group's prompt, then each response's own tokens). Scores
  are then computed over `prefix + window + BAND_CHUNK` keys per query instead of the row's width
  (`banded_attention`); the segment ids still decide which keys a query sees.

  It is read while tracing and is not part of `jax.jit`'s cache key: enter it inside the jitted
  function (as `train.rl.experience_forwards` and `rl_update` do), never around a call of a function
  jitted elsewhere, which may reuse a trace made without it (or with another band)."""
  token = _BAND.set((prefix, window))
  try:
    yield
  finally:
    _BAND.reset(token)


def banded_attention(q, keys, values, allowed, prefix: int, window: int, scale: float,
                     chunk: int = BAND_CHUNK):
  """Attention of queries [B, T, K, G, H] over keys / values [B, T, K, H] under `attention_band`'s
  assumption. `allowed(q_slots [M, Q], k_slots [M, S]) -> bool [B, M, Q, S]`: may query slot
  `q_slots[m, i]` see key slot `k_slots[m, j]` (slot -1: padding, never). Queries after the
  prefix go in chunks of `chunk`; each chunk's scores cover the prefix's keys and its band of
  `window + chunk` slots (band slots below the prefix are left to the prefix part).
  -> [B, T, K, G, H]."""
  b, t = q.shape[:2]
  m = -(-(t - prefix) // chunk)
  q_slot = prefix + np.arange(m * chunk).reshape(m, chunk)
  q_slot = np.where(q_slot < t, q_slot, -1)
  k_slot = prefix + np.arange(m)[:, None] * chunk - window + np.arange(window + chunk)[None]
  k_slot = np.where((k_slot >= prefix) & (k_slot < t), k_slot, -1)
  kb, vb = keys[:, np.maximum(k_slot, 0)], values[:, np.maximum(k_slot, 0)]  # [B, m, W + C, K, H]
  kp, vp = keys[:, :prefix], values[:, :prefix]
  q_rest = jnp.pad(q[:, prefix:], [(0, 0), (0, m * chunk - t + prefix)] + [(0, 0)] * 3).reshape(
      b, m, chunk, *q.shape[2:])
  neg = jnp.finfo(jnp.float32).min
  allow_p = allowed(q_slot, np.broadcast_to(np.arange(prefix), (m, prefix)))  # [B, m, C, P]
  allow_b = allowed(q_slot, k_slot)  # [B, m, C, W + C]
  sp = jnp.einsum("BMCKGH,BSKH->BMKGCS", q_rest, kp).astype(jnp.float32) * scale
  sb = jnp.einsum("BMCKGH,BMSKH->BMKGCS", q_rest, kb).astype(jnp.float32) * scale
  probs = jax.nn.softmax(jnp.concatenate([jnp.where(allow_p[:, :, None, None], sp, neg),
                                          jnp.where(allow_b[:, :, None, None], sb, neg)], -1),
                         axis=-1).astype(q.dtype)
  out = (jnp.einsum("BMKGCS,BSKH->BMCKGH", probs[..., :prefix], vp)
         + jnp.einsum("BMKGCS,BMSKH->BMCKGH", probs[..., prefix:], vb))
  out = out.reshape(b, m * chunk, *q.shape[2:])[:, :t - prefix]
  if not prefix:
    return out
  s0 = jnp.einsum("BTKGH,BSKH->BKGTS", q[:, :prefix], kp).astype(jnp.float32) * scale
  s0 = jnp.where(allowed(np.arange(prefix)[None], np.arange(prefix)[None])[:, 0, None, None], s0, neg)
  out0 = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s0, axis=-1).astype(q.dtype), vp)
  return jnp.concatenate([out0, out], axis=1)


def dot_product_attention(q, k, v, mask, scale):
  """`jax.nn.dot_product_attention` of q [B, T, N, H] over k, v [B, S, K, H] where `mask` [B, 1, T, S]
  allows: cuDNN's fused kernel on GPU where it takes the inputs (bf16 / fp16; a head dim <= 128 and
  a multiple of 8; with a mask, T and S even, which its backward checks only when differentiated),
  XLA's elsewhere and wherever cuDNN refuses them while tracing."""
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and h <= 128
      and h % 8 == 0 and t % 2 == 0 and s % 2 == 0):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError, TypeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _visible(q_slot, k_slot, seg_q, seg_k, pos_q, pos_k, window: int, is_local):
  """May a query see a key, without a cache (arrays broadcast together): causal over slots (-1:
  padding, never), a real key, and in packed rows (`models.sequence.Packing`, whose mask holds
  segment ids) its own segment's keys and, in a shared-prompt row (`models.sequence.
  share_lengths`), its group's prompt (0/1 masks are unaffected: a real query's keys are all 1);
  on local layers the sliding window, over positions (packed rows keep each sequence's own)."""
  ok = (k_slot <= q_slot) & (k_slot >= 0) & (q_slot >= 0) & (seg_k > 0)
  ok = ok & ((seg_k == seg_q) | (seg_q == 0) | (seg_k == seg_q // SEGMENT_GROUP * SEGMENT_GROUP))
  if is_local is not None:
    ok = ok & ((pos_q - pos_k < window) | ~is_local)
  return ok


class Attention(nn.Module):
  cfg: TransformerConfig
  q_from: int = 0  # no cache: queries (and outputs) only at slots >= q_from; keys at every slot

  @nn.compact
  def __call__(self, x, positions, mask, cache, cache_index, is_local=None):
    """`cache`: this layer's `{"k", "v"}` [B, K, S, H] arrays or None; it writes its new keys/values
    into them. `is_local`: this layer's scalar bool, None when the model has no local layers."""
    cfg = self.cfg
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wq = self.param("wq", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, n, h), pdt)
    wk = self.param("wk", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, k, h), pdt)
    wv = self.param("wv", _dense_init((ax.EMBED, ax.HEADS, ax.KV)), (cfg.d_model, k, h), pdt)
    wo = self.param("wo", _dense_init((ax.HEADS, ax.KV, ax.EMBED)), (n, h, cfg.d_model), pdt)

    q0 = self.q_from
    q = linear("BTD,DNH->BTNH", x[:, q0:], wq.astype(dt))  # [batch, time, heads, head_dim]
    kk = linear("BTD,DKH->BTKH", x, wk.astype(dt))  # [batch, time, kv_heads, head_dim]
    vv = linear("BTD,DKH->BTKH", x, wv.astype(dt))
    if cfg.qkv_bias:
      bias = lambda name, heads: self.param(
          name, nn.with_logical_partitioning(nn.initializers.zeros, (ax.HEADS, ax.KV)), (heads, h), pdt)
      q = q + bias("bq", n).astype(dt)
      kk = kk + bias("bk", k).astype(dt)
      vv = vv + bias("bv", k).astype(dt)
    if cfg.qk_norm:
      head_norm = lambda name: RMSNorm(cfg.norm_eps, dt, pdt, plus_one=cfg.norm_plus_one, axis_name=ax.KV,
                                       name=name)
      q, kk = head_norm("q_norm")(q), head_norm("k_norm")(kk)
    if cfg.rope_scaling == "none" and not cfg.has_local_layers:
      q, kk = rope(q, positions[:, q0:], cfg.rope_base), rope(kk, positions, cfg.rope_base)
    else:
      freq = rope_frequencies(cfg)
      if is_local is not None:
        freq = jnp.where(is_local, rope_frequencies(cfg, local=True), freq)
      q, kk = rope(q, positions[:, q0:], cfg.rope_base, freq), rope(kk, positions, cfg.rope_base, freq)

    t = x.shape[1]
    if cache is None:
      keys, values, kv = kk, vv, "BSKH"
      new_cache = None
    else:
      write = lambda c, new: jax.lax.dynamic_update_slice(  # noqa: E731  [B, T, K, H] -> [B, K, T, H]
          c, new.astype(c.dtype).swapaxes(1, 2), (0, 0, cache_index, 0))
      new_cache = {"k": write(cache["k"], kk), "v": write(cache["v"], vv)}
      keys, values, kv = new_cache["k"], new_cache["v"], "BKSH"  # read in the cache's own layout
      q_slot = cache_index + jnp.arange(t)
    scale = h ** -0.5 if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    band = _BAND.get() if cache is None else None
    if band is not None and t > sum(band) + BAND_CHUNK and not q0:  # a shared-prompt row (`attention_band`)
      out = banded_attention(q.reshape(q.shape[0], t, k, n // k, h), keys.astype(dt), values.astype(dt),
                             functools.partial(self._allowed, mask, positions, is_local), *band, scale)
      return self._out(out.reshape(x.shape[0], t, n, h), wo), new_cache
    s = keys.shape[kv.index("S")]
    if cache is None:  # [B, T, S]
      slots = np.arange(t)
      allowed = _visible(slots[None, q0:, None], slots[None, None, :], mask[:, q0:, None], mask[:, None, :],
                         positions[:, q0:, None], positions[:, None, :], cfg.sliding_window, is_local)
    else:  # keys: the cache's filled slots; the sliding window over slots (= positions: a row's
      # real tokens are contiguous)
      allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & (mask[:, None, :] > 0)
      if is_local is not None:
        in_window = (q_slot[:, None] - jnp.arange(s)[None, :] < cfg.sliding_window)[None]  # [1, T, S]
        allowed = allowed & (in_window | ~is_local)

    if cache is None and cfg.attention == "dot_product":
      return self._out(dot_product_attention(q, keys.astype(dt), values.astype(dt), allowed[:, None], scale),
                       wo), new_cache
    q = q.reshape(q.shape[0], t - q0, k, n // k, h)  # [batch, time, kv_heads, group, head_dim]
    logits = jnp.einsum(f"BTKGH,{kv}->BKGTS", q, keys.astype(dt)).astype(jnp.float32) * scale
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum(f"BKGTS,{kv}->BTKGH", probs, values.astype(dt)).reshape(x.shape[0], t - q0, n, h)
    return self._out(out, wo), new_cache

  def _allowed(self, segments, positions, is_local, q_slots, k_slots):
    """`_visible` [B, M, Q, S] for the slots `q_slots` [M, Q] and `k_slots` [M, S] (-1: padding)
    of the no-cache forward (`banded_attention`'s `allowed`)."""
    take = lambda a, i: jnp.take(a, np.maximum(i, 0).reshape(-1), axis=1).reshape(  # noqa: E731
        a.shape[0], *i.shape)
    return _visible(q_slots[None, :, :, None], k_slots[None, :, None, :],
                    take(segments, q_slots)[..., None], take(segments, k_slots)[:, :, None, :],
                    take(positions, q_slots)[..., None], take(positions, k_slots)[:, :, None, :],
                    self.cfg.sliding_window, is_local)

  def _out(self, out, wo):
    """The output projection (+ bias) of the heads' outputs [B, T, N, H] -> [B, T, D]."""
    cfg = self.cfg
    out = linear("BTNH,NHD->BTD", out, wo.astype(cfg.compute_dtype))
    if cfg.out_bias:
      bo = self.param("bo", nn.with_logical_partitioning(nn.initializers.zeros, (ax.EMBED,)),
                      (cfg.d_model,), cfg.params_dtype)
      out = out + bo.astype(cfg.compute_dtype)
    return out


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    w_gate = self.param("w_gate", _dense_init((ax.EMBED, ax.MLP)), (cfg.d_model, cfg.d_ff), pdt)
    w_up = self.param("w_up", _dense_init((ax.EMBED, ax.MLP)), (cfg.d_model, cfg.d_ff), pdt)
    w_down = self.param("w_down", _dense_init((ax.MLP, ax.EMBED)), (cfg.d_ff, cfg.d_model), pdt)
    gate = linear("BTD,DF->BTF", x, w_gate.astype(dt))  # [batch, time, d_ff]
    up = linear("BTD,DF->BTF", x, w_up.astype(dt))
    return linear("BTF,FD->BTD", gated(cfg.mlp_activation, gate, up), w_down.astype(dt))


GATE_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(activation: str, gate: jax.Array, up: jax.Array) -> jax.Array:
  """The gated MLP's `act(gate) * up`, keeping only `gate` and `up` for the backward pass.

  It recomputes `act(gate)` there. Under `jax.grad` of the plain product, the layer scan also
  stacked `act(gate)` and its intermediates: [layers, batch, time, d_ff] buffers, each
  zero-filled and then written once per layer. Dropping them made the 4.2 M-parameter update's
  gradient ~8 % faster on XLA:CPU. Same math as the plain product.
  """
  return GATE_ACTIVATIONS[activation](gate) * up


def _gated_fwd(activation, gate, up):
  return gated(activation, gate, up), (gate, up)


def _gated_bwd(activation, res, g):
  gate, up = res
  if activation == "silu":  # silu' = s (1 + x (1 - s)), s = sigmoid(x)
    s = jax.nn.sigmoid(gate)
    return g * up * s * (1 + gate * (1 - s)), g * gate * s
  act, act_vjp = jax.vjp(GATE_ACTIVATIONS[activation], gate)
  return act_vjp(g * up)[0], g * act


gated.defvjp(_gated_fwd, _gated_bwd)


class Block(nn.Module):
  """One pre-norm layer; the scan body. Carry: (hidden states, this layer's cache or None);
  per-layer inputs: its index (and, with local layers, its `is_local` flag); no per-layer output."""

  cfg: TransformerConfig
  q_from: int = 0  # no cache: outputs only at slots >= q_from (`Attention.q_from`)

  @nn.compact
  def __call__(self, carry, layer, positions, mask, cache_index, is_local=None):
    cfg = self.cfg
    x, cache = carry
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype,
                                plus_one=cfg.norm_plus_one, name=name)
    attn_out, new_cache = Attention(cfg, self.q_from, name="attn")(norm("attn_norm")(x), positions, mask,
                                                                  cache, cache_index, is_local)
    if cfg.post_norms:
      attn_out = norm("post_attn_norm")(attn_out)
    x = x[:, self.q_from:] + attn_out
    mlp_out = MLP(cfg, name="mlp")(norm("mlp_norm")(x))
    if cfg.post_norms:
      mlp_out = norm("post_mlp_norm")(mlp_out)
    x = x + mlp_out
    return (nn.with_logical_constraint(x, ACTIVATIONS), new_cache), None


class Trunk(nn.Module):
  """Embedding + scanned layers + final norm. Returns hidden states [B, T, D] and the new cache.

  `out_from` (no cache): hidden states only of the slots >= `out_from`, [B, T - out_from, D], for
  a forward whose earlier outputs nothing reads (the RL losses read the columns that predict
  response tokens). With `unstack_layers`' parameters (the RL update passes them so) the layers
  run one by one and the last computes its queries, attention, output projection and MLP only
  there (its keys and values at every slot): the policy gradient at 16 x 23 tokens is then ~15 %
  faster on XLA:CPU than the scan's over all slots. With the scan's stacked parameters the scan
  runs every slot (one by one over sliced parameters was no faster) and the rest is cut.
  """

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5), (ax.VOCAB, ax.EMBED)),
        (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
    block = (nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat_policy])
             if cfg.remat else Block)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        # layer index, positions, mask, cache_index (+ the per-layer is_local flags with local layers)
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast) + ((0,) if cfg.has_local_layers else ()),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: ax.LAYERS},
    )(cfg, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, plus_one=cfg.norm_plus_one,
                              name="final_norm")

  def __call__(self, tokens, positions, mask, cache: Cache | None = None, cache_index=0, out_from: int = 0):
    cfg = self.cfg
    if cfg.embed_scale:
      # Gemma-style: small embedding init (tied logits start near N(0, 1)), inputs scaled by sqrt(d).
      # sqrt(d) is a weakly-typed constant, so the product is in the embedding's dtype (as in HF Gemma).
      x = jnp.take(self.embedding, tokens, axis=0) * jnp.sqrt(float(cfg.d_model))
    else:
      x = jnp.take(self.embedding, tokens, axis=0)
    x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), ACTIVATIONS)  # [batch, time, d_model]
    per_layer = ()
    if cfg.has_local_layers:
      per_layer = (jnp.asarray([t == "local" for t in cfg.layer_types]),)  # [layers] bool
    if cache is not None and out_from:
      raise ValueError("out_from is for the no-cache forward; a cached forward computes every new slot")
    if cache is None and UNSTACKED in self.layers.variables.get("params", {}):
      # the layers one by one, each over its own parameters, the last only at the slots >= out_from
      layers = nn.unbox(self.layers.variables["params"])
      # prevent_cse: outside a scan body, XLA could otherwise merge the recomputed forward with
      # the original and keep every activation
      block = (nn.remat(Block, prevent_cse=True, policy=REMAT_POLICIES[cfg.remat_policy])
               if cfg.remat else Block)
      for i in range(cfg.n_layers):
        (x, _), _ = block(cfg, out_from if i == cfg.n_layers - 1 else 0, parent=None).apply(
            {"params": layer_params(layers, i)}, (x, None), i, positions, mask, cache_index,
            *(f[i] for f in per_layer))
      return self.final_norm(x), None
    if cache is None:
      (x, _), _ = self.layers((x, None), jnp.arange(cfg.n_layers), positions, mask, cache_index,
                              *per_layer)
      return self.final_norm(x[:, out_from:]), None
    # With a cache: the layers unrolled over the scan's stacked parameters, each with its own arrays
    stacked = nn.unbox(self.layers.variables["params"])
    new_cache = {"k": [], "v": []}
    for i in range(cfg.n_layers):
      (x, layer_cache), _ = Block(cfg, parent=None).apply(
          {"params": layer_params(stacked, i)}, (x, {c: cache[c][i] for c in ("k", "v")}),
          i, positions, mask, cache_index, *(f[i] for f in per_layer))
      for c in ("k", "v"):
        new_cache[c].append(layer_cache[c])
    return self.final_norm(x), {c: tuple(v) for c, v in new_cache.items()}

  def attend(self, h):
    """Logits through the tied embedding: [B, T, D] -> [B, T, V] in f32."""
    return linear("BTD,VD->BTV", h, self.embedding.astype(h.dtype)).astype(jnp.float32)


UNSTACKED = "unstacked"


def unstack_layers(trunk_params: dict) -> dict:
  """`trunk_params` with the scan's stacked layer parameters split into one tree per layer (under
  `layers/unstacked`), for the cached (decode) forward: it then reads each layer's weights where
  they lie instead of slicing the stacked arrays on every step. The no-cache forward takes either
  form (unstacked: the layers one by one, as with `Trunk`'s `out_from`)."""
  stacked = trunk_params["layers"]
  if UNSTACKED in stacked:
    return trunk_params
  n = jax.tree.leaves(stacked)[0].shape[0]
  return {**trunk_params, "layers": {UNSTACKED: tuple(layer_params(stacked, i) for i in range(n))}}


def stack_layers(trunk_params: dict) -> dict:
  """The inverse of `unstack_layers`: per-layer trees stacked back on the scan's leading axis."""
  layers = trunk_params["layers"]
  if UNSTACKED not in layers:
    return trunk_params
  return {**trunk_params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers[UNSTACKED])}


def _is_trunk_tree(x) -> bool:
  return (isinstance(x, dict) and isinstance(x.get("trunk"), dict)
          and {"embedding", "layers", "final_norm"} <= set(x["trunk"]))


def map_trunks(fn, tree):
  """`tree` (parameters, gradients, an optimizer state, a TrainState: any pytree) with `fn` applied
  to each built-in trunk's parameters in it (every dict whose "trunk" is a `Trunk`'s), e.g.
  `unstack_layers` on a TrainState's parameters and Adam moments alike."""
  return jax.tree.map(lambda x: {**x, "trunk": fn(x["trunk"])} if _is_trunk_tree(x) else x, tree,
                      is_leaf=_is_trunk_tree)


def layer_params(layers: dict, i: int) -> dict:
  """Layer `i`'s parameters from the scan's stacked ones or from `unstack_layers`'."""
  return layers[UNSTACKED][i] if UNSTACKED in layers else jax.tree.map(lambda a: a[i], layers)


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache for `length` slots: one [batch, kv_heads, length, head_dim] array per layer."""
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return {c: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for c in ("k", "v")}
