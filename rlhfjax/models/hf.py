"""Hugging Face checkpoints in and out: `config.json` + `*.safetensors` <-> (TransformerConfig, params).

Families: Llama 3.x (`LlamaForCausalLM`), Qwen2/2.5 (`Qwen2ForCausalLM`), Qwen3 (`Qwen3ForCausalLM`),
Gemma 3 text (`Gemma3ForCausalLM`), and the text trunk of Gemma 3 multimodal checkpoints
(`Gemma3ForConditionalGeneration`: `text_config`, weights under `language_model.model.` or
`model.language_model.`; the vision tower's tensors are never read, and `save_hf` writes the text-only
`Gemma3ForCausalLM`). All are the one trunk in `rlhfjax.models.transformer` with its
family switches set; `PolicyModel(cfg).apply({"params": params}, tokens, positions, mask)` gives the
logits transformers gives for the same tokens, attention mask and position ids.

Loading is lazy: tensors are read through `safetensors.safe_open` slice by slice. With a mesh, every
leaf is made with `jax.make_array_from_callback` on the model's `NamedSharding`, so each device reads
only the slice it holds (HF's [out, in] matrices are transposed, split into heads and stacked over layers
inside that read) and no leaf is ever whole on one device.

Both `config.json` layouts are read: transformers 4.x (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`) and 5.x (`rope_parameters`, per layer type for Gemma 3,
`layer_types`). `save_hf` writes the 4.x layout, which both read.

What the trunk cannot reproduce is refused, never approximated: a config key it lacks (quantization,
yarn / dynamic / longrope RoPE, partial rotary, soft-capping, MLP biases, 4.x and 5.x keys that disagree)
is a one-line ValueError from config.json alone, and a checkpoint tensor the config does not use (a bias
with `attention_bias` false, ...) or a non-float one is refused before any weight is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models.heads import PolicyModel
from rlhfjax.models.init import init_params, logical_specs
from rlhfjax.models.transformer import TransformerConfig

# architectures entry -> model_type
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
_SUPPORTED_LINE = ", ".join(f"{a} ({t})" for a, t in SUPPORTED.items()) + \
    ", Gemma3ForConditionalGeneration (gemma3, text trunk only)"
_INDEX = "model.safetensors.index.json"
# Gemma3TextConfig's defaults: a multimodal checkpoint's `text_config` lists only what differs from them
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "sliding_window": 4096, "tie_word_embeddings": True}
# transformers' config-class defaults of the keys that change the model, for a config.json without them
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen2": {"max_position_embeddings": 32_768, "tie_word_embeddings": False, "hidden_act": "silu",
              "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32_768, "tie_word_embeddings": False, "hidden_act": "silu",
              "head_dim": 128, "sliding_window": 4096, "max_window_layers": 28},
    "gemma3_text": {**_GEMMA3_TEXT_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256},
}
# multimodal weight-name prefixes (transformers 4.5x / newer layouts) -> the text model's names
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


# ----------------------------------------------------------------------------------------------------
# config.json -> TransformerConfig


def _rope_sections(hf: dict, family: str, where: str) -> tuple[dict, dict | None]:
  """(global RoPE params, local-layer RoPE params or None), each {"rope_type", "rope_theta", ...}.

  The 4.x keys (`rope_scaling`, `rope_theta`, `partial_rotary_factor`, Gemma's `rope_local_base_freq`)
  fill in what 5.x `rope_parameters` leaves out, as transformers 5.x reads them; where both give a value
  they must agree (transformers 4.x reads only the former, 5.x mostly the latter): one-line ValueError."""
  gemma = family == "gemma3_text"
  rp = hf.get("rope_parameters") or {}
  nested = "full_attention" in rp or "sliding_attention" in rp
  if rp and nested != gemma:
    raise ValueError(f"{where}: rope_parameters={rp} is not supported for {family} (transformers reads "
                     + ("one dict per layer type, full_attention / sliding_attention)" if gemma else
                        "one dict, not one per layer type)"))
  glob = _rope_type_key(dict(rp.get("full_attention") or {}) if nested else dict(rp))
  loc = _rope_type_key(dict(rp.get("sliding_attention") or {})) if gemma else None
  old = _rope_type_key(dict(hf.get("rope_scaling") or {}))
  old.update({k: hf[k] for k in ("rope_theta", "partial_rotary_factor") if hf.get(k) is not None})
  given = [(glob, old, "")]
  if gemma:
    old_loc = {"rope_theta": hf["rope_local_base_freq"]} if hf.get("rope_local_base_freq") is not None else {}
    if hf.get("partial_rotary_factor") is not None:
      old_loc["partial_rotary_factor"] = hf["partial_rotary_factor"]
    given.append((loc, old_loc, "sliding_attention "))
  for sec, old_keys, what in given:
    for k, v in old_keys.items():
      if k in sec and sec[k] != v:
        raise ValueError(f"{where}: rope_parameters' {what}{k}={sec[k]!r} disagrees with the transformers-4.x "
                         f"key giving {k}={v!r} (rope_scaling / rope_theta / rope_local_base_freq / "
                         "partial_rotary_factor)")
      sec.setdefault(k, v)
  glob.setdefault("rope_type", "default")
  glob.setdefault("rope_theta", 1_000_000.0 if gemma else 10_000.0)
  if glob["rope_type"] in ("llama3", "yarn", "longrope"):  # 5.x: the top-level key wins, then max positions
    top = hf.get("original_max_position_embeddings")
    if top is not None and glob.get("original_max_position_embeddings", top) != top:
      raise ValueError(f"{where}: original_max_position_embeddings={top} disagrees with the rope parameters' "
                       f"{glob['original_max_position_embeddings']}")
    glob.setdefault("original_max_position_embeddings", top or hf["max_position_embeddings"])
  if gemma:
    loc.setdefault("rope_type", "default")
    loc.setdefault("rope_theta", 10_000.0)
  return glob, loc


def _rope_type_key(sec: dict) -> dict:
  """`sec` with the 4.x `type` key read as `rope_type` (which wins where both are given, as in transformers)."""
  kind = sec.pop("type", None)
  if kind is not None:
    sec.setdefault("rope_type", kind)
  return sec


def _layer_types(hf: dict, family: str, n_layers: int, where: str) -> tuple[str, ...]:
  """Per layer "global" / "local", or () when no layer uses a sliding window."""
  if family == "gemma3_text":
    # transformers reads `sliding_window_pattern` (its default 6); the `_sliding_window_pattern` 5.x
    # writes beside `layer_types` is never read back
    names = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention"
        for i in range(n_layers)]
    if hf.get("sliding_window") is None and "sliding_attention" in names:
      raise ValueError(f"{where}: sliding_window=None with sliding_attention layers is not supported "
                       "(transformers cannot run it either)")
  elif family in ("qwen2", "qwen3"):
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    names = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf["max_window_layers"] else "full_attention"
        for i in range(n_layers)]
    if not window and "sliding_attention" in names:
      raise ValueError(f"{where}: layer_types has sliding_attention layers but use_sliding_window="
                       f"{hf.get('use_sliding_window')!r}, sliding_window={hf.get('sliding_window')!r}")
  else:
    names = ["full_attention"] * n_layers
  bad = set(names) - {"full_attention", "sliding_attention"}
  if bad or len(names) != n_layers:
    raise ValueError(f"{where}: unsupported layer_types {names} (expected {n_layers} of "
                     "full_attention/sliding_attention)")
  types = tuple("local" if t == "sliding_attention" else "global" for t in names)
  return types if "local" in types else ()


def _rope_fields(sec: dict, where: str) -> dict:
  kind = sec.get("rope_type", "default")
  if sec.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor={sec['partial_rotary_factor']} is not supported")

  def need(key):
    if sec.get(key) is None:
      raise ValueError(f"{where}: rope type {kind!r} needs {key!r} (got {sec})")
    return sec[key]

  if kind == "default":
    return {"rope_scaling": "none"}
  if kind == "linear":
    return {"rope_scaling": "linear", "rope_scaling_factor": float(need("factor"))}
  if kind == "llama3":
    return {"rope_scaling": "llama3", "rope_scaling_factor": float(need("factor")),
            "rope_low_freq_factor": float(need("low_freq_factor")),
            "rope_high_freq_factor": float(need("high_freq_factor")),
            "rope_original_max_len": int(need("original_max_position_embeddings"))}
  raise ValueError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _family(hf: dict, where: str) -> str:
  archs = hf.get("architectures") or []
  family = hf.get("model_type")
  known = [SUPPORTED[a] for a in archs if a in SUPPORTED]
  if (archs and not known) or family not in SUPPORTED.values() or (known and known[0] != family):
    raise ValueError(f"{where}: unsupported checkpoint (architectures={archs}, model_type={family!r}); "
                     f"supported: {_SUPPORTED_LINE}")
  return family


def text_config(hf: dict) -> dict:
  """A Gemma 3 multimodal `config.json` dict -> its text model's, as a `Gemma3ForCausalLM` config
  (Gemma3TextConfig defaults filled in); any other dict as it is."""
  if hf.get("model_type") != "gemma3" and "Gemma3ForConditionalGeneration" not in (hf.get("architectures") or []):
    return hf
  tied = {"tie_word_embeddings": hf["tie_word_embeddings"]} if "tie_word_embeddings" in hf else {}
  return {**_GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **tied,
          "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}


def config_from_hf(hf: dict, dtype: str = "float32", where: str = "config.json") -> TransformerConfig:
  """The `TransformerConfig` of a Hugging Face `config.json` dict (either layout; Gemma 3 multimodal
  gives its text model). A key the model would need and this trunk lacks (quantization, yarn RoPE, soft-capping,
  partial rotary, MLP biases, ...) is a one-line ValueError naming it: never a silently different model."""
  for d in (hf, hf.get("text_config") or {}):
    for key in ("quantization_config", "compression_config"):
      if d.get(key):
        q = d[key]
        method = q.get("quant_method", q.get("format")) if isinstance(q, dict) else q
        raise ValueError(f"{where}: {key} (quant_method={method!r}) is not supported: quantized checkpoints "
                         "load only unquantized (dequantize first)")
  hf = text_config(hf)
  family = _family(hf, where)
  hf = {**_FAMILY_DEFAULTS[family], **hf}  # what transformers' config class fills in
  gemma = family == "gemma3_text"
  n_heads = hf["num_attention_heads"]
  n_layers = hf["num_hidden_layers"]
  act_key = "hidden_activation" if gemma else "hidden_act"  # the one key each family's MLP reads
  act = hf[act_key]
  acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
  if act not in acts:
    raise ValueError(f"{where}: {act_key}={act!r} is not supported (supported: {sorted(acts)})")
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(key) is not None:
      raise ValueError(f"{where}: {key}={hf[key]} is not supported")
  for key in ("mlp_bias", "use_bidirectional_attention"):
    if hf.get(key):
      raise ValueError(f"{where}: {key}={hf[key]!r} is not supported")
  if gemma and not isinstance(hf["query_pre_attn_scalar"], (int, float)):
    raise ValueError(f"{where}: query_pre_attn_scalar={hf['query_pre_attn_scalar']!r} is not a number")
  glob, loc = _rope_sections(hf, family, where)
  rope = _rope_fields(glob, where)
  layer_types = _layer_types(hf, family, n_layers, where)
  if gemma and _rope_fields(loc, where + " (sliding_attention)")["rope_scaling"] != "none":
    raise ValueError(f"{where}: scaled RoPE on sliding-window layers is not supported")
  # Qwen2's q/k/v always have biases and its o_proj never: transformers reads no attention_bias there
  attention_bias = bool(hf.get("attention_bias", False)) and family != "qwen2"
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
      max_len=hf["max_position_embeddings"], rope_base=float(glob["rope_theta"]),
      tie_embeddings=bool(hf["tie_word_embeddings"]), dtype=dtype, param_dtype=dtype,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      embed_scale=gemma, norm_plus_one=gemma, qkv_bias=attention_bias or family == "qwen2",
      out_bias=attention_bias, qk_norm=family in ("qwen3", "gemma3_text"), post_norms=gemma,
      mlp_activation=acts[act],
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma else None,
      layer_types=layer_types, sliding_window=int(hf.get("sliding_window") or 0) if layer_types else 0,
      rope_local_base=float(loc["rope_theta"]) if gemma else None, **rope)


# ----------------------------------------------------------------------------------------------------
# the tensor map: our leaf <-> HF tensor name and how the layouts differ

# kinds (ours <- HF):  "same": identical; "t": [in, out] <- [out, in]; "in_heads": [D, N, H] <- [N*H, D];
# "out_heads": [N, H, D] <- [D, N*H]; "bias_heads": [N, H] <- [N*H]


def _tensor_map(cfg: TransformerConfig) -> dict[tuple[str, ...], tuple[str, str, bool]]:
  """Our param path -> (HF name, with `{}` for the layer index when stacked, kind, stacked)."""
  gemma = cfg.post_norms
  L = "model.layers.{}."
  m = {("trunk", "embedding"): ("model.embed_tokens.weight", "same", False),
       ("trunk", "final_norm", "scale"): ("model.norm.weight", "same", False)}
  layer = {("attn", "wq"): ("self_attn.q_proj.weight", "in_heads"),
           ("attn", "wk"): ("self_attn.k_proj.weight", "in_heads"),
           ("attn", "wv"): ("self_attn.v_proj.weight", "in_heads"),
           ("attn", "wo"): ("self_attn.o_proj.weight", "out_heads"),
           ("mlp", "w_gate"): ("mlp.gate_proj.weight", "t"),
           ("mlp", "w_up"): ("mlp.up_proj.weight", "t"),
           ("mlp", "w_down"): ("mlp.down_proj.weight", "t"),
           ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
           ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight" if gemma else
                                   "post_attention_layernorm.weight", "same")}
  if cfg.qkv_bias:
    for p, name in (("bq", "q"), ("bk", "k"), ("bv", "v")):
      layer[("attn", p)] = (f"self_attn.{name}_proj.bias", "bias_heads")
  if cfg.out_bias:
    layer[("attn", "bo")] = ("self_attn.o_proj.bias", "same")
  if cfg.qk_norm:
    layer[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", "same")
    layer[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", "same")
  if cfg.post_norms:
    layer[("post_attn_norm", "scale")] = ("post_attention_layernorm.weight", "same")
    layer[("post_mlp_norm", "scale")] = ("post_feedforward_layernorm.weight", "same")
  for path, (name, kind) in layer.items():
    m[("trunk", "layers") + path] = (L + name, kind, True)
  if not cfg.tie_embeddings:
    m[("lm_head",)] = ("lm_head.weight", "t", False)
  return m


def _span(s: slice, n: int) -> tuple[int, int]:
  start, stop, step = s.indices(n)
  if step != 1:
    raise ValueError("strided shard slices are not supported")
  return start, stop


def _read(get: Callable[[str], Any], name: str, kind: str, shape: tuple[int, ...], idx: tuple[slice, ...]):
  """The slice `idx` of our (unstacked) leaf of `shape`, read from HF tensor `name` (only that part)."""
  t = get(name)
  if kind == "same":
    return t[idx]
  if kind == "t":
    return t[idx[1], idx[0]].T
  if kind == "in_heads":  # ours [D, N, H]; HF rows are n * H + h
    (d0, d1), (n0, n1), h = _span(idx[0], shape[0]), _span(idx[1], shape[1]), shape[2]
    x = t[n0 * h:n1 * h, d0:d1].reshape(n1 - n0, h, d1 - d0)
    return x[:, idx[2], :].transpose(2, 0, 1)
  if kind == "out_heads":  # ours [N, H, D]; HF cols are n * H + h
    (n0, n1), h, (d0, d1) = _span(idx[0], shape[0]), shape[1], _span(idx[2], shape[2])
    x = t[d0:d1, n0 * h:n1 * h].reshape(d1 - d0, n1 - n0, h)
    return x[:, :, idx[1]].transpose(1, 2, 0)
  if kind == "bias_heads":  # ours [N, H]
    (n0, n1), h = _span(idx[0], shape[0]), shape[1]
    return t[n0 * h:n1 * h].reshape(n1 - n0, h)[:, idx[1]]
  raise AssertionError(kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `_read` on a whole (unstacked) leaf."""
  if kind == "same":
    return x
  if kind == "t":
    return x.T
  if kind == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if kind == "out_heads":
    return x.reshape(-1, x.shape[-1]).T
  if kind == "bias_heads":
    return x.reshape(-1)
  raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------------
# load_hf


def weight_files(path: str) -> list[str]:
  """The checkpoint's *.safetensors paths (one-line FileNotFoundError when absent or incomplete)."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors weights (model.safetensors or {_INDEX}); "
                            "pytorch_model.bin checkpoints are not supported")
  missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f"{path}: checkpoint file(s) missing: {', '.join(missing)}")
  return [os.path.join(path, f) for f in files]


def read_hf_config(path: str) -> dict:
  """The `config.json` dict of checkpoint directory `path` (one-line errors when it is not one)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
  with open(cfg_file) as f:
    return json.load(f)


def load_hf(path: str, *, dtype: str = "float32", mesh=None, rules=None):
  """Load a Hugging Face safetensors checkpoint directory -> (TransformerConfig, PolicyModel params).

  `dtype` is both the parameter and the compute dtype of the returned config; tensors are converted on
  load. With `mesh` every leaf is placed on the model's `NamedSharding` (logical axes through `rules`,
  default `rlhfjax.parallel.axes.DEFAULT_RULES`), each device reading only its own slice.
  """
  from safetensors import safe_open  # lazy: the rest of rlhfjax runs without it

  hf = read_hf_config(path)
  cfg = config_from_hf(hf, dtype, where=os.path.join(path, "config.json"))
  files = weight_files(path)
  np_dtype = np.dtype(jnp.dtype(dtype))
  model = PolicyModel(cfg)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))  # shapes only
  tmap = _tensor_map(cfg)
  shardings = None
  if mesh is not None:
    from rlhfjax.parallel import axes as ax
    from rlhfjax.parallel import logical_to_sharding
    shardings = logical_to_sharding(logical_specs(model), mesh, ax.DEFAULT_RULES if rules is None else rules)

  prefixes = _TEXT_PREFIXES if text_config(hf) is not hf else ()
  with contextlib.ExitStack() as stack:
    handles = [stack.enter_context(safe_open(f, framework="numpy")) for f in files]
    where = {_text_name(k, prefixes): (h, k) for h in handles for k in h.keys()}  # our name -> (file, its)

    def get(name):
      if name not in where:
        raise ValueError(f"{path}: tensor {name} is missing from the checkpoint")
      h, key = where[name]
      return h.get_slice(key)

    def leaf(key_path, spec):
      p = tuple(k.key for k in key_path)
      if p not in tmap:
        raise AssertionError(f"no Hugging Face tensor for parameter {'/'.join(p)}")
      name, kind, stacked = tmap[p]
      shape = tuple(spec.shape)

      def read(idx):
        idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
        if not stacked:
          x = _read(get, name, kind, shape, idx)
        else:
          l0, l1 = _span(idx[0], shape[0])
          x = np.stack([_read(get, name.format(l), kind, shape[1:], idx[1:]) for l in range(l0, l1)])
        return np.ascontiguousarray(x, dtype=np_dtype)

      if shardings is None:
        return jnp.asarray(read(tuple(slice(None) for _ in shape)))
      return jax.make_array_from_callback(shape, _get_path(shardings, p), read)

    _check_shapes(get, tmap, shapes, path)  # metadata only
    text = {n for n, (h, k) in where.items() if not prefixes or n != k or n.startswith("lm_head.")}
    _check_unused(get, tmap, shapes, path, text, cfg.tie_embeddings)
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
  return cfg, params


def _text_name(key: str, prefixes) -> str:
  for theirs, ours in prefixes:
    if key.startswith(theirs):
      return ours + key[len(theirs):]
  return key


def _get_path(tree, p):
  for k in p:
    tree = tree[k]
  return tree


def _check_shapes(get, tmap, shapes, path):
  """Full HF tensor shapes agree with the config (a sliced read could hide a mismatch), and every tensor
  is a float one (quantized weights are refused even without a `quantization_config`)."""
  for p, (name, kind, stacked) in tmap.items():
    shape = tuple(_get_path(shapes, p).shape)
    want = _to_hf(np.empty(shape[1:] if stacked else shape, np.int8), kind).shape
    for n in ([name.format(l) for l in range(shape[0])] if stacked else [name]):
      t = get(n)
      got = tuple(t.get_shape())
      if got != want:
        raise ValueError(f"{path}: {n} has shape {got}, the config implies {want}")
      if t.get_dtype() not in _FLOAT_DTYPES:
        raise ValueError(f"{path}: {n} has dtype {t.get_dtype()} (quantized weights are not supported; "
                         f"expected one of {', '.join(_FLOAT_DTYPES)})")


_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_ROWS = 8192  # rows per read when comparing an untied-looking lm_head.weight with the embedding


def _check_unused(get, tmap, shapes, path, names, tied):
  """No checkpoint tensor among `names` is left unread, bar RoPE's `inv_freq` buffers: a tensor the
  config does not explain (a bias with `attention_bias` false, an MLP bias, a value head, ...) is a
  one-line ValueError, not a silently different model. With `tie_word_embeddings` an `lm_head.weight`
  equal to the embedding is accepted (read in row blocks to compare); a different one is refused, as
  transformers 5.x would then leave the two untied and 4.x tie them."""
  want = set()
  for p, (name, kind, stacked) in tmap.items():
    want.update([name.format(l) for l in range(_get_path(shapes, p).shape[0])] if stacked else [name])
  extra = sorted(n for n in names - want if not n.endswith("rotary_emb.inv_freq"))
  if tied and "lm_head.weight" in extra:
    head, emb = get("lm_head.weight"), get("model.embed_tokens.weight")
    rows = emb.get_shape()[0]
    if tuple(head.get_shape()) != tuple(emb.get_shape()) or any(
        not np.array_equal(head[r:min(r + _ROWS, rows)], emb[r:min(r + _ROWS, rows)])
        for r in range(0, rows, _ROWS)):
      raise ValueError(f"{path}: tie_word_embeddings=True, but the checkpoint's lm_head.weight differs from "
                       "model.embed_tokens.weight (set tie_word_embeddings to false if the head is its own)")
    extra.remove("lm_head.weight")
  if extra:
    more = f" and {len(extra) - 4} more" if len(extra) > 4 else ""
    raise ValueError(f"{path}: {len(extra)} checkpoint tensor(s) the config does not use: "
                     f"{', '.join(extra[:4])}{more} (e.g. a bias with attention_bias / mlp_bias false)")


# ----------------------------------------------------------------------------------------------------
# save_hf


def _hf_family(cfg: TransformerConfig) -> str:
  gemma_bits = (cfg.norm_plus_one, cfg.post_norms, cfg.mlp_activation == "gelu_tanh",
                cfg.query_pre_attn_scalar is not None, cfg.rope_local_base is not None)
  if any(gemma_bits):
    if not (cfg.norm_plus_one and cfg.post_norms and cfg.qk_norm and cfg.mlp_activation == "gelu_tanh"
            and cfg.embed_scale and cfg.qkv_bias == cfg.out_bias):
      raise ValueError("config mixes Gemma 3 switches with others; no Hugging Face family matches it")
    return "gemma3_text"
  if cfg.mlp_activation != "silu":
    raise ValueError(f"mlp_activation={cfg.mlp_activation!r} has no Hugging Face family here")
  if cfg.qk_norm:
    family = "qwen3"
  elif cfg.qkv_bias and not cfg.out_bias:
    family = "qwen2"
  else:
    family = "llama"
  if cfg.qkv_bias != cfg.out_bias and family != "qwen2":
    raise ValueError("q/k/v and output biases must be both on or both off for Llama / Qwen3 exports")
  if cfg.has_local_layers and family == "llama":
    raise ValueError("sliding-window layers have no Llama export")
  return family


def hf_config(cfg: TransformerConfig) -> dict:
  """The transformers-4.x-layout `config.json` dict of `cfg` (read by transformers 4.x and 5.x)."""
  family = _hf_family(cfg)
  arch = {v: k for k, v in SUPPORTED.items()}[family]
  gemma = family == "gemma3_text"
  # A non-Gemma model with the sqrt(d) input scale is exported with the scale folded into an untied
  # input embedding (the output head stays the unscaled matrix): the same function.
  tied = cfg.tie_embeddings and (gemma or not cfg.embed_scale)
  hf = {"architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": tied, "torch_dtype": cfg.param_dtype, "attention_dropout": 0.0}
  if family != "qwen2":
    hf["attention_bias"] = cfg.qkv_bias
  if gemma:
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    hf.update(hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # 5.x wants an int
              rope_local_base_freq=cfg.rope_local_base if cfg.rope_local_base is not None else cfg.rope_base,
              final_logit_softcapping=None, attn_logit_softcapping=None, pad_token_id=0)
  else:
    hf["hidden_act"] = "silu"
  if family == "llama":
    hf["mlp_bias"] = False
  types = cfg.layer_types or ("global",) * cfg.n_layers
  names = ["sliding_attention" if t == "local" else "full_attention" for t in types]
  if gemma:
    hf.update(layer_types=names, sliding_window=cfg.sliding_window if cfg.has_local_layers else None)
  elif cfg.has_local_layers:
    hf.update(layer_types=names, use_sliding_window=True, sliding_window=cfg.sliding_window,
              max_window_layers=types.index("local"))
  if cfg.rope_scaling == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                          "low_freq_factor": cfg.rope_low_freq_factor,
                          "high_freq_factor": cfg.rope_high_freq_factor,
                          "original_max_position_embeddings": cfg.rope_original_max_len}
  else:
    hf["rope_scaling"] = None
  return hf


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def save_hf(cfg: TransformerConfig, params, path: str, tokenizer=None) -> None:
  """Write `params` (a `PolicyModel(cfg)` tree; other subtrees such as a value head are ignored) as a
  Hugging Face checkpoint directory: config.json + model.safetensors that
  `transformers.AutoModelForCausalLM.from_pretrained(path)` loads with the same logits.

  `tokenizer`: an object with `save_pretrained(path)` (a transformers tokenizer), or a directory whose
  tokenizer files (tokenizer.json, tokenizer_config.json, ...) are copied. A model loaded from a Gemma 3
  multimodal checkpoint is written as the text-only `Gemma3ForCausalLM` (no vision tower).
  """
  from safetensors.numpy import save_file

  hf = hf_config(cfg)
  tmap = _tensor_map(dataclasses.replace(cfg, tie_embeddings=hf["tie_word_embeddings"]))
  tensors = {}
  for p, (name, kind, stacked) in tmap.items():
    if p == ("lm_head",) and cfg.tie_embeddings:  # untied only to fold the input scale
      x = np.asarray(jax.device_get(params["trunk"]["embedding"])).T
    else:
      x = np.asarray(jax.device_get(_get_path(params, p)))
    if p == ("trunk", "embedding") and cfg.embed_scale and hf["model_type"] != "gemma3_text":
      x = x * np.asarray(np.sqrt(float(cfg.d_model)), x.dtype)  # as Trunk computes it
    if stacked:
      for l in range(x.shape[0]):
        tensors[name.format(l)] = np.ascontiguousarray(_to_hf(x[l], kind))
    else:
      tensors[name] = np.ascontiguousarray(_to_hf(x, kind))
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is None:
    return
  if hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(path)
    return
  src = os.fspath(tokenizer)
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: tokenizer directory not found")
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(path, name))
