"""Masked reductions and whitening over the response tokens of a padded batch.

``x`` and ``mask`` have the same shape (usually ``[batch, length]``), ``mask`` 1.0 on tokens that
count. Mask-0 entries never influence a result, even ``inf`` or ``nan`` ones. Reductions run in
float32 or wider; ``axis=None`` reduces everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``x * mask`` in float32 or wider, masked-out entries exactly 0 (``inf * 0`` cannot leak)."""
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mask = jnp.asarray(mask, x.dtype)
  return jnp.where(mask != 0, x * mask, jnp.zeros((), x.dtype))


def masked_sum(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """``sum(x * mask, axis)``."""
  return jnp.sum(_masked(x, mask), axis=axis, keepdims=keepdims)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """``sum(x * mask) / sum(mask)`` over ``axis``; 0 (not nan) for a slice with no masked entry."""
  total = masked_sum(x, mask, axis=axis, keepdims=keepdims)
  count = jnp.sum(jnp.asarray(mask, total.dtype), axis=axis, keepdims=keepdims)
  return total / jnp.where(count > 0, count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False, *,
               unbiased: bool = True) -> jax.Array:
  """Variance over masked entries; ``unbiased``: Bessel's ``n / (n - 1)`` (as TRL's ``masked_var``
  and ``torch.var``), not applied with ``n <= 1`` masked entries (the variance is then 0)."""
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  # 0 on mask-0 entries before squaring, so an inf / nan there cannot make the gradient nan.
  centered = jnp.where(jnp.asarray(mask) != 0, jnp.asarray(x).astype(mean.dtype) - mean, 0.0)
  var = masked_mean(centered * centered, mask, axis=axis, keepdims=keepdims)
  if unbiased:
    count = jnp.sum(jnp.asarray(mask, var.dtype), axis=axis, keepdims=keepdims)
    var = var * jnp.where(count > 1, count / jnp.where(count > 1, count - 1, 1.0), 1.0)
  return var


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` over all masked entries of the batch, unbiased variance
  (lm-human-preferences ``whiten`` with TRL's masked variance); mask-0 entries are 0.

  ``shift_mean=False`` only rescales: ``(x - mean) / std + mean``.
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  x = jnp.where(jnp.asarray(mask) != 0, x, 0.0)  # an inf / nan on padding: no nan gradient
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=True)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return _masked(out, mask)
