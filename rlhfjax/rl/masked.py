"""Masked reductions and whitening over the response tokens of a padded batch.

All functions take ``x`` and a ``mask`` of the same shape (usually ``[batch, length]``) where
``mask`` is 1.0 on tokens that count and 0.0 on padding. Entries with mask 0 never influence the
result, even if they hold ``inf`` or ``nan`` (padded log-probabilities often do). Reductions are
computed in float32 (or wider), so bfloat16 inputs give float32 results with exact token counts.
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
  """Sum of ``x`` weighted by ``mask``.

  Args:
    x: values, any shape, e.g. ``[batch, length]``.
    mask: same shape as ``x``; 1.0 where an entry counts.
    axis: axis or axes to reduce; ``None`` reduces everything.
    keepdims: keep reduced axes with size 1.

  Returns:
    ``sum(x * mask, axis)``.
  """
  return jnp.sum(_masked(x, mask), axis=axis, keepdims=keepdims)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """Mean of ``x`` over entries where ``mask`` is set: ``sum(x * mask) / sum(mask)``.

  A slice with no masked entries has mean 0 (not nan), so all-padding rows are harmless.

  Args:
    x: values, e.g. ``[batch, length]``.
    mask: same shape as ``x``.
    axis: axis or axes to reduce; ``None`` reduces everything.
    keepdims: keep reduced axes with size 1.

  Returns:
    The masked mean, with ``axis`` reduced.
  """
  total = masked_sum(x, mask, axis=axis, keepdims=keepdims)
  count = jnp.sum(jnp.asarray(mask, total.dtype), axis=axis, keepdims=keepdims)
  return total / jnp.where(count > 0, count, 1.0)


def masked_var(
    x: jax.Array, mask: jax.Array, axis=None, keepdims: bool = False, *, unbiased: bool = True
) -> jax.Array:
  """Variance of ``x`` over entries where ``mask`` is set.

  Args:
    x: values, e.g. ``[batch, length]``.
    mask: same shape as ``x``.
    axis: axis or axes to reduce; ``None`` reduces everything.
    keepdims: keep reduced axes with size 1.
    unbiased: apply Bessel's correction ``n / (n - 1)`` (the convention of TRL's ``masked_var``
      and ``torch.var``). With ``n <= 1`` masked entries the biased value (0) is returned.

  Returns:
    The masked variance, with ``axis`` reduced.
  """
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  centered = jnp.asarray(x).astype(mean.dtype) - mean
  var = masked_mean(centered * centered, mask, axis=axis, keepdims=keepdims)
  if unbiased:
    count = jnp.sum(jnp.asarray(mask, var.dtype), axis=axis, keepdims=keepdims)
    var = var * jnp.where(count > 1, count / jnp.where(count > 1, count - 1, 1.0), 1.0)
  return var


def whiten(
    x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
  """Normalizes ``x`` to zero mean and unit variance over all masked entries of the batch.

  ``(x - mean) / sqrt(var + eps)`` with mean and *unbiased* variance (see ``masked_var``) taken
  over every entry where ``mask`` is set, across the whole batch (as in Ziegler et al. 2019 /
  lm-human-preferences ``whiten``, with TRL's masked unbiased variance).

  Args:
    x: values to normalize, e.g. advantages ``[batch, length]``.
    mask: same shape as ``x``.
    shift_mean: if False, only rescale: the mean is added back, ``(x - mean) / std + mean``.
    eps: added to the variance before the square root.

  Returns:
    Whitened ``x``, same shape, float32 or wider; entries with mask 0 are 0.
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=True)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return _masked(out, mask)
