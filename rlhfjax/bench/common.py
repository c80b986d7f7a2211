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


def memory_bandwidth(mib: int | None = None, iters: int = 5, reps: int = 4,
                     device=None) -> tuple[float, int]:
  """(bytes/s, bytes of the array) of a jitted `x + 1` over a float32 array of `mib` MiB on `device`
  (default the first): read + write = 2 x its bytes per call; `reps` chained calls per timing
  (dispatch hidden), median of `iters`. Default 256 MiB on CPU, 2 GiB elsewhere (past any cache:
  the HBM rate)."""
  import jax
  import jax.numpy as jnp
  device = device or jax.devices()[0]
  mib = mib or (256 if device.platform == "cpu" else 2048)
  add = jax.jit(lambda x: x + 1)
  x = jax.block_until_ready(add(jax.device_put(jnp.zeros((mib * 2**18,), jnp.float32), device)))

  def chain():
    y = x
    for _ in range(reps):
      y = add(y)
    return y

  return 2.0 * x.nbytes * reps / statistics.median(time_calls(chain, iters)), int(x.nbytes)


def peak_for(peak: dict, dtype: str) -> float:
  return float(peak.get(dtype) or peak["float32"])


# `--size` presets: the model-shape flags of the benches that take them all (sample, sft, ppo_update,
# rm_score); explicit flags win. Heads = d_model / head_dim, GQA 2:1, tied embeddings (see below).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "vocab": 512, "head_dim": 16, "d_ff": 192},  # CPU smoke tests
    "1b": {"d_model": 2048, "n_layers": 16, "vocab": 32000, "head_dim": 128, "d_ff": 8192},  # Llama-like 1.07 B
}


def bench_model_config(*, vocab: int, d_model: int, n_layers: int, max_len: int, head_dim: int = 64,
                       d_ff: int | None = None, dtype: str = "float32", param_dtype: str = "float32",
                       remat: bool | str = False, attention: str = "einsum"):
  """A standard-shaped model: heads = d_model / head_dim, GQA 2:1, SwiGLU width `d_ff` (default
  3 x d_model), weights stored in `param_dtype`; `remat` as in `remat_fields`; `attention` the
  no-cache attention (`TransformerConfig.attention`)."""
  from rlhfjax.models.transformer import TransformerConfig
  n_heads = max(1, d_model // head_dim)
  return TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=max(1, n_heads // 2) if n_heads % 2 == 0 else n_heads,
                           head_dim=head_dim, d_ff=d_ff or 3 * d_model, max_len=max_len, dtype=dtype,
                           param_dtype=param_dtype, attention=attention, **remat_fields(remat))


def remat_fields(remat: bool | str | None) -> dict:
  """`TransformerConfig`'s remat fields for a bench's `--remat`: off (False, None, "none"), True
  ("full") or a `remat_policy` name."""
  if not remat or remat == "none":
    return {"remat": False}
  return {"remat": True, "remat_policy": "full" if remat is True else remat}


def remat_tag(remat: bool | str | None) -> str:
  """A row's config suffix: "", " remat" (full) or " remat=dots"."""
  f = remat_fields(remat)
  return "" if not f["remat"] else " remat" if f["remat_policy"] == "full" else f" remat={f['remat_policy']}"


def shape_tag(d_model: int, n_layers: int, vocab, head_dim: int = 64, d_ff: int | None = None) -> str:
  """The model part of a row's config: `d512 L8 V8192`, + ` hd128 ff8192` where not the defaults."""
  return (f"d{d_model} L{n_layers} V{vocab}" + (f" hd{head_dim}" if head_dim != 64 else "")
          + (f" ff{d_ff}" if d_ff else ""))


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
  return {"bench": bench, "config": config, "dtype": dtype, "params": params,
          "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "peak_flops_per_s": peak_v,
          "ratio": flops_per_s / peak_v, "step_s": step_s, "compile_s": compile_s,
          "memory": memory or {}, **extra}
