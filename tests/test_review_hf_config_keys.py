"""config.json keys and checkpoint tensors that `load_hf` must either honour exactly (logits equal to
transformers') or refuse with one line naming the key, before any weight is read.

Each case edits the config.json (or the tensors) of a tiny random transformers checkpoint: the cases
that load are compared with transformers on the edited checkpoint; the refused ones must raise a
one-line ValueError, from config.json alone where the key is a config key.
"""

import copy
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
import safetensors.numpy  # noqa: E402

from rlhfjax.models import load_hf  # noqa: E402
from rlhfjax.models.hf import config_from_hf  # noqa: E402
from hf_compare import (fast_settings, from_pretrained, hf_logits, left_padded_batch, max_diff,  # noqa: E402
                        our_logits, randomize)

ATOL = 2e-4
V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
GEMMA = dict(SMALL, num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=False),
    # Llama 3.2 style: tied head; attention_bias; head_dim 12 != 32 / 4
    "llama_bias": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True,
                                                   head_dim=12),
    "llama_tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    # Qwen2 sliding window: layer 1 local (max_window_layers=1), window 4 < the 23 test tokens
    "qwen2_sw": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False, use_sliding_window=True,
                                                 sliding_window=4, max_window_layers=1),
    "qwen3_sw": lambda: transformers.Qwen3Config(**SMALL, head_dim=12, attention_bias=True,
                                                 tie_word_embeddings=False, use_sliding_window=True,
                                                 sliding_window=4, max_window_layers=1),
    "gemma3": lambda: transformers.Gemma3TextConfig(**GEMMA),
}


_fast = pytest.fixture(scope="module", autouse=True)(fast_settings)


@functools.lru_cache(maxsize=None)
def _hf_model(name):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(MODELS[name](), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
  return randomize(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> a saved checkpoint directory of `_hf_model(name)` (5.x config layout)."""
  paths = {}

  def get(name):
    if name not in paths:
      paths[name] = str(tmp_path_factory.mktemp(name))
      _hf_model(name).save_pretrained(paths[name])
    return paths[name]
  return get


def _batch():
  return left_padded_batch(V, 23, 9)


def _edit_config(src, dst, edit):
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    c = json.load(f)
  edit(c)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(c, f)
  return dst


def _edit_tensors(src, dst, edit):
  shutil.copytree(src, dst)
  file = os.path.join(dst, "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
  return dst


def _exact(path, base=None, changes=None):
  """load_hf(path) gives transformers' logits for `path`; with `base`, `changes` says whether transformers
  reads the edit as a different model than `base` (so the edit is not a no-op the test could miss)."""
  ids, mask = _batch()
  ref = hf_logits(from_pretrained(path), ids, mask)
  cfg, params = load_hf(path)
  assert max_diff(our_logits(cfg, params, ids, mask), ref, mask) <= ATOL
  if base is not None:
    moved = max_diff(hf_logits(from_pretrained(base), ids, mask), ref, mask)
    assert moved > 0.05 if changes else moved == 0.0
  return cfg


def _pop_in(d, *keys):
  for k in keys[:-1]:
    d = d[k]
  d.pop(keys[-1])


# (model, config edit, does transformers read it as another model): each loaded silently wrong, or crashed,
# before the fix
LOADS_EXACTLY = {
    # 5.x rope_parameters without rope_theta: transformers takes the top-level rope_theta
    "rope_theta_beside_rope_parameters": ("llama", lambda c: (_pop_in(c, "rope_parameters", "rope_theta"),
                                                              c.update(rope_theta=500.0)), True),
    # llama3 RoPE without original_max_position_embeddings: transformers 5.x uses max_position_embeddings
    "llama3_without_original_max": ("llama", lambda c: c.update(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "rope_theta": 10000.0}), True),
    # Llama's MLP reads hidden_act only (a stray Gemma-style hidden_activation is ignored)
    "llama_hidden_activation_ignored": ("llama", lambda c: c.update(hidden_activation="gelu_pytorch_tanh"),
                                        False),
    # Qwen2 reads no attention_bias (q/k/v biased, o_proj not, always)
    "qwen2_attention_bias_ignored": ("qwen2_sw", lambda c: c.update(attention_bias=True), False),
    # Gemma 3: sliding_attention RoPE missing from rope_parameters -> rope_local_base_freq
    "gemma3_rope_local_base_freq": ("gemma3", lambda c: (_pop_in(c, "rope_parameters", "sliding_attention"),
                                                         c.update(rope_local_base_freq=500.0)), True),
    # Gemma 3: full_attention without rope_theta -> the top-level rope_theta
    "gemma3_rope_theta_top_level": ("gemma3", lambda c: (
        _pop_in(c, "rope_parameters", "full_attention", "rope_theta"), c.update(rope_theta=500.0)), True),
    # Gemma 3 without a sliding_window key: Gemma3TextConfig's 4096 (the local layers keep their own RoPE)
    "gemma3_sliding_window_default": ("gemma3", lambda c: c.pop("sliding_window"), True),
}


@pytest.mark.parametrize("case", list(LOADS_EXACTLY))
def test_config_keys_load_as_transformers_reads_them(case, saved, tmp_path):
  name, edit, changes = LOADS_EXACTLY[case]
  base = saved(name)
  _exact(_edit_config(base, str(tmp_path / case), edit), base, changes)


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_sw", "qwen3_sw"])
def test_biases_head_dim_tied_sliding_window_match_transformers(name, saved):
  cfg = _exact(saved(name))
  if name == "llama_bias":
    assert cfg.qkv_bias and cfg.out_bias and cfg.tie_embeddings and cfg.head_dim == 12
  else:
    assert cfg.layer_types == ("global", "local") and cfg.sliding_window == 4


def test_bfloat16_checkpoint(tmp_path):
  """Published checkpoints are bf16: read (through ml_dtypes) into either dtype, the same weights as
  transformers'."""
  path = str(tmp_path / "bf16")
  copy.deepcopy(_hf_model("llama")).to(torch.bfloat16).save_pretrained(path)  # .to() is in place
  _exact(path)
  cfg, params = load_hf(path, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def _one_line(match, fn, *args):
  with pytest.raises(ValueError, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value)
  return str(e.value)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}
# (model, config edit, the error's pattern): refused from config.json alone
REFUSED = {
    "quantization_config": ("llama", lambda c: c.update(quantization_config={"quant_method": "fp8"}),
                            r"quantization_config \(quant_method='fp8'\) is not supported"),
    "compression_config": ("llama", lambda c: c.update(compression_config={"format": "int-quantized"}),
                           "compression_config .*is not supported"),
    # a silently wrong model before: the 4.x-layout top-level factor was not read at all
    "partial_rotary_factor_4x": ("llama", lambda c: (c.pop("rope_parameters"), c.update(
        rope_theta=10000.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"},
        partial_rotary_factor=0.5)),
        "partial_rotary_factor=0.5 is not supported"),
    "partial_rotary_factor_5x": ("llama", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.25),
                                 "partial_rotary_factor=0.25 is not supported"),
    # silently wrong before: rope_parameters was read, transformers reads rope_scaling
    "rope_scaling_and_rope_parameters": ("llama", lambda c: c.update(rope_scaling={"type": "linear", "factor": 4}),
                                         "rope_type='default' disagrees .*rope_type='linear'"),
    "rope_theta_disagrees": ("llama", lambda c: c.update(rope_theta=1.0), "rope_theta=10000.0 disagrees"),
    "original_max_disagrees": ("llama", lambda c: c.update(rope_parameters=LLAMA3,
                                                           original_max_position_embeddings=48),
                               "original_max_position_embeddings=48 disagrees"),
    "llama3_missing_factor": ("llama", lambda c: c.update(rope_parameters={
        k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}), "rope type 'llama3' needs 'low_freq_factor'"),
    "yarn": ("llama", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
             "rope type 'yarn' is not supported"),
    "dynamic_4x": ("llama", lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "dynamic",
                                                                                        "factor": 2.0})),
                   "rope type 'dynamic' is not supported"),
    "longrope": ("llama", lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
                 "rope type 'longrope' is not supported"),
    "su_4x": ("llama", lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "su"})),
              "rope type 'su' is not supported"),
    "nested_rope_parameters_on_llama": ("llama", lambda c: c.update(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "rope_parameters=.* is not supported for llama"),
    "gelu": ("llama", lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "mlp_bias": ("llama", lambda c: c.update(mlp_bias=True), "mlp_bias=True is not supported"),
    "mistral": ("llama", lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"]),
                "unsupported checkpoint .*MistralForCausalLM"),
    "sequence_classification": ("llama", lambda c: c.update(architectures=["LlamaForSequenceClassification"]),
                                "unsupported checkpoint .*LlamaForSequenceClassification"),
    "qwen2_layer_types_without_window": ("qwen2_sw", lambda c: c.update(use_sliding_window=False),
                                         "layer_types has sliding_attention layers but use_sliding_window=False"),
    "qwen2_yarn_4x": ("qwen2_sw", lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})), "rope type 'yarn'"),
    # silently wrong before: every layer became global (global RoPE on the local layers)
    "gemma3_sliding_window_null": ("gemma3", lambda c: c.update(sliding_window=None),
                                   "sliding_window=None with sliding_attention layers is not supported"),
    # silently wrong before: read as the global RoPE (transformers 5.x ignores a flat dict for Gemma 3)
    "gemma3_flat_rope_parameters": ("gemma3", lambda c: c.update(rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 1e3}),
                                    "rope_parameters=.* is not supported for gemma3_text"),
    # silently wrong before: transformers 5.x merges rope_scaling into full_attention
    "gemma3_rope_scaling_and_rope_parameters": ("gemma3", lambda c: c.update(rope_scaling={
        "rope_type": "linear", "factor": 4.0}), "rope_type='default' disagrees"),
    "gemma3_local_base_disagrees": ("gemma3", lambda c: c.update(rope_local_base_freq=7.0),
                                    "sliding_attention rope_theta=10000.0 disagrees"),
    "gemma3_local_scaled": ("gemma3", lambda c: c["rope_parameters"]["sliding_attention"].update(
        rope_type="linear", factor=2.0), "scaled RoPE on sliding-window layers is not supported"),
    "gemma3_final_softcap": ("gemma3", lambda c: c.update(final_logit_softcapping=30.0),
                             "final_logit_softcapping=30.0 is not supported"),
    "gemma3_attn_softcap": ("gemma3", lambda c: c.update(attn_logit_softcapping=50.0),
                            "attn_logit_softcapping=50.0 is not supported"),
    "gemma3_query_pre_attn_scalar_null": ("gemma3", lambda c: c.update(query_pre_attn_scalar=None),
                                          "query_pre_attn_scalar=None is not a number"),
    "gemma3_gelu_exact": ("gemma3", lambda c: c.update(hidden_activation="gelu"),
                          "hidden_activation='gelu' is not supported"),
    "gemma3_bidirectional": ("gemma3", lambda c: c.update(use_bidirectional_attention=True),
                             "use_bidirectional_attention=True is not supported"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_keys_refused_before_weights(case, saved, tmp_path):
  """The one-line ValueError comes from config.json alone: the directory has no weights at all (a
  loader that looked at them first would raise FileNotFoundError)."""
  name, edit, match = REFUSED[case]
  src = saved(name)
  os.makedirs(tmp_path / "cfg_only")
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "cfg_only")
  path = _edit_config(str(tmp_path / "cfg_only"), str(tmp_path / case), edit)
  assert not any(f.endswith(".safetensors") for f in os.listdir(path))
  _one_line(match, load_hf, path)


def test_multimodal_quantization_config_refused():
  text = MODELS["gemma3"]().to_dict()
  mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text}
  assert config_from_hf(mm).has_local_layers  # loads without it
  _one_line("quantization_config .*'bitsandbytes'", config_from_hf,
            {**mm, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
  _one_line("quantization_config", config_from_hf, {**mm, "text_config": {**text, "quantization_config": {
      "quant_method": "gptq"}}})


def test_unused_tensors_refused(saved, tmp_path):
  """A tensor the config does not explain was dropped silently (transformers drops it too, with a
  warning): now a one-line error naming it. RoPE inv_freq buffers (older checkpoints) stay accepted."""
  base = saved("llama")
  q_bias = _edit_tensors(base, str(tmp_path / "q_bias"), lambda t: t.update(
      {"model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)}))
  _one_line("1 checkpoint tensor.* not use: model.layers.0.self_attn.q_proj.bias", load_hf, q_bias)
  mlp = _edit_tensors(base, str(tmp_path / "mlp"), lambda t: t.update(
      {f"model.layers.{i}.mlp.{p}_proj.bias": np.ones(64 if p != "down" else 32, np.float32)
       for i in range(2) for p in ("gate", "up", "down")}))
  _one_line("6 checkpoint tensor.*gate_proj.bias.* and 2 more", load_hf, mlp)
  inv_freq = _edit_tensors(base, str(tmp_path / "inv_freq"), lambda t: t.update(
      {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in range(2)}))
  _exact(inv_freq, base, changes=False)


def test_tied_checkpoint_with_an_lm_head(saved, tmp_path):
  """tie_word_embeddings with an lm_head.weight in the file: the embedding's copy loads (same model);
  a different head is refused (transformers 5.x would leave the two untied)."""
  base = saved("llama_tied")
  same = _edit_tensors(base, str(tmp_path / "same"), lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  _exact(same, base, changes=False)
  rng = np.random.default_rng(0)
  other = _edit_tensors(base, str(tmp_path / "other"), lambda t: t.update(
      {"lm_head.weight": rng.standard_normal((V, 32)).astype(np.float32)}))
  ids, mask = _batch()  # transformers reads it as another model
  assert max_diff(hf_logits(from_pretrained(other), ids, mask), hf_logits(from_pretrained(base), ids, mask),
                   mask) > 0.05
  _one_line("tie_word_embeddings=True, but the checkpoint's lm_head.weight differs", load_hf, other)


def test_integer_weights_refused(saved, tmp_path):
  """Quantized weights without a quantization_config (e.g. stripped from config.json) are refused by
  their dtype instead of being cast to floats."""
  path = _edit_tensors(saved("llama"), str(tmp_path / "int8"), lambda t: t.update(
      {"model.layers.1.mlp.up_proj.weight": np.ones((64, 32), np.int8)}))
  _one_line("model.layers.1.mlp.up_proj.weight has dtype I8", load_hf, path)
