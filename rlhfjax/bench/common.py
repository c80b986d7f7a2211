"""What every bench shares: timing, the matmul peak, a standard model shape, meshes, compiled memory.

Imports nothing from `rlhfjax.bench` (the bench modules import this one, the package imports them).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def time_calls(fn: Callable[[], Any], iters: int) -> list[float]:
  """Seconds per call of `fn` (which must return something `block_until_ready` accepts)."""
  import jax
  out = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def default_matmul_size(platform: str) -> int:
  return 1024 if platform == "cpu" else 8192


def matmul_peak(n: int | None = None, dtypes: tuple[str, ...] | None = None, iters: int = 10,
                device=None) -> dict:
  """{"n", "platform", "<dtype>": FLOP/s} of a jitted `n x n @ n x n` matmul on `device` (default
  the first), median of `iters` calls after warmup. Defaults: n 1024 and float32 on CPU, 8192 and
  float32 + bfloat16 elsewhere."""
  import jax
  import jax.numpy as jnp
  device = device or jax.devices()[0]
  n = n or default_matmul_size(device.platform)
  dtypes = dtypes or (("float32",) if device.platform == "cpu" else ("float32", "bfloat16"))
  result: dict[str, Any] = {"n": n, "platform": device.platform}
  for dt in dtypes:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), dt), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dt), device)
    # HIGHEST: a true f32 matmul (the TPU default would be bf16 passes); the dtype names what ran.
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST
                                         if dt == "float32" else None))
    jax.block_until_ready(mm(a, b))  # compile + warm up
    sec = statistics.median(time_calls(lambda: mm(a, b), iters))
    result[dt] = 2.0 * n ** 3 / sec
  return result


def peak_for(peak: dict, dtype: str) -> float:
  return float(peak.get(dtype) or peak["float32"])


def bench_model_config(*, vocab: int, d_model: int, n_layers: int, max_len: int, head_dim: int = 64,
                       dtype: str = "float32", remat: bool = False):
  """A standard-shaped model: heads = d_model / head_dim, GQA 2:1, SwiGLU width 3 x d_model."""
  from rlhfjax.models.transformer import TransformerConfig
  n_heads = max(1, d_model // head_dim)
  return TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=max(1, n_heads // 2) if n_heads % 2 == 0 else n_heads,
                           head_dim=head_dim, d_ff=3 * d_model, max_len=max_len, dtype=dtype,
                           param_dtype="float32", remat=bool(remat))


def make_mesh(devices: str):
  """A one-device mesh ("one") or all devices on the data axis ("all")."""
  import jax
  from rlhfjax.parallel import create_mesh
  if devices == "all":
    return create_mesh((-1, 1, 1))
  return create_mesh((1, 1, 1), jax.devices()[:1])


def compiled_memory(compiled) -> dict:
  """Bytes from `compiled.memory_analysis()` ({} on backends that do not report it)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not implemented on some backends)
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if getattr(m, k, None) is not None}


def result(bench: str, config: str, *, params: int, tokens_per_s: float, flops_per_s: float,
           peak: dict, dtype: str, step_s: float, compile_s: float, memory: dict | None = None,
           **extra) -> dict:
  """The row dict every bench returns (`ratio` = achieved / the measured matmul peak)."""
  peak_v = peak_for(peak, dtype)
  return {"bench": bench, "config": config, "params": params, "tokens_per_s": tokens_per_s,
          "flops_per_s": flops_per_s, "peak_flops_per_s": peak_v, "ratio": flops_per_s / peak_v,
          "step_s": step_s, "compile_s": compile_s, "memory": memory or {}, **extra}
