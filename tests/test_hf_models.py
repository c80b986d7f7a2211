"""Hugging Face checkpoints in and out (`rlhfjax.models.load_hf` / `save_hf`) against transformers.

For each family a tiny random model is built with transformers (float32; GQA, tied/untied heads,
head_dim != d_model / heads, rope scaling, biases, a sliding window shorter than the test sequences),
saved, loaded, and compared: logits on a left-padded batch, 12 greedy tokens, both config.json layouts,
and `save_hf` output reloaded by transformers.
"""

import dataclasses
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

from rlhfjax.models import PolicyModel, TransformerConfig, init_params, load_hf, save_hf  # noqa: E402
from rlhfjax.models.hf import config_from_hf  # noqa: E402
from rlhfjax.models.init import logical_specs  # noqa: E402
from rlhfjax.parallel import create_mesh, logical_to_sharding  # noqa: E402
from rlhfjax.sampling import SamplingConfig, generate  # noqa: E402
from hf_compare import (fast_settings, from_pretrained, hf_logits, left_padded_batch, max_diff,  # noqa: E402
                        our_logits, randomize)

ATOL = 2e-4
NEW = 12
V = 96

FAMILIES = {
    # Llama 3.x: GQA 6/2, untied head, llama3 rope scaling whose band edges fall inside head_dim/2
    "llama3": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Qwen2/2.5: q/k/v biases, tied embeddings, GQA 4/2
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen3: q/k norms, head_dim 12 != 32 / 4, untied, GQA 4/1
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False),
    # Gemma 3 text: local/global layers (window 4 < the test's 23 tokens), own local RoPE base,
    # query_pre_attn_scalar != head_dim, linear rope scaling on global layers
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


_fast = pytest.fixture(scope="module", autouse=True)(fast_settings)


@functools.lru_cache(maxsize=None)
def _hf_model(family):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
  randomize(model)
  return model


def _batch():
  return left_padded_batch(V, 11, 7)


def _to_4x_layout(src, dst):
  """A copy of checkpoint `src` whose config.json uses the transformers-4.x keys."""
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    c = json.load(f)
  rp = c.pop("rope_parameters")
  if "full_attention" in rp:  # Gemma 3: per layer type
    c["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    rp = rp["full_attention"]
    c["sliding_window_pattern"] = 2  # layer_types [local, global, local] as the 4.x pattern ...
    c.pop("layer_types")  # ... gives [local, global, local]
  c["rope_theta"] = rp.pop("rope_theta")
  c["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(c, f)
  return dst


@pytest.fixture(scope="module", params=list(FAMILIES))
def ckpt(request, tmp_path_factory):
  family = request.param
  model = _hf_model(family)
  path = str(tmp_path_factory.mktemp(family))
  model.save_pretrained(path)
  with open(os.path.join(path, "config.json")) as f:
    assert "rope_parameters" in json.load(f)  # transformers 5.x writes the 5.x layout
  cfg, params = load_hf(path)
  return family, model, path, cfg, params


def test_logits_match_transformers(ckpt):
  family, model, path, cfg, params = ckpt
  ids, mask = _batch()
  diff = max_diff(our_logits(cfg, params, ids, mask), hf_logits(model, ids, mask), mask)
  print(f"{family}: max |logit diff| {diff:.2e}")
  assert diff <= ATOL


# the family feature each test model exercises: turned off, the logits must be far from transformers'
FEATURE_OFF = {"llama3": {"rope_scaling": "none"}, "qwen2": {"qkv_bias": False}, "qwen3": {"qk_norm": False},
               "gemma3": {"sliding_window": 1000}}


def test_the_tested_features_matter(ckpt):
  family, model, path, cfg, params = ckpt
  ids, mask = _batch()
  off = dataclasses.replace(cfg, **FEATURE_OFF[family])
  assert max_diff(our_logits(off, params, ids, mask), hf_logits(model, ids, mask), mask) > 0.05


def test_greedy_tokens_match_transformers(ckpt):
  family, model, path, cfg, params = ckpt
  ids, mask = _batch()
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
  ref = ref[:, ids.shape[1]:].numpy()
  out = generate(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jax.random.key(0),
                 SamplingConfig(model=cfg, max_new_tokens=NEW, eos_id=V, greedy=True))  # V: never produced
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  assert len(np.unique(ref)) >= 5  # not a degenerate repeat-one-token model


def test_4x_config_layout(ckpt, tmp_path):
  family, model, path, cfg, params = ckpt
  old = _to_4x_layout(path, str(tmp_path / "old"))
  cfg_old, params_old = load_hf(old)
  assert cfg_old == cfg
  jax.tree.map(np.testing.assert_array_equal, params_old, params)
  ids, mask = _batch()  # and transformers reads the edited layout as the same model
  assert max_diff(hf_logits(from_pretrained(old), ids, mask), hf_logits(model, ids, mask), mask) == 0.0


def test_save_hf_reloads_in_transformers(ckpt, tmp_path):
  family, model, path, cfg, params = ckpt
  out = str(tmp_path / "out")
  save_hf(cfg, params, out)
  ids, mask = _batch()
  assert max_diff(hf_logits(from_pretrained(out), ids, mask), our_logits(cfg, params, ids, mask), mask) <= ATOL
  cfg2, params2 = load_hf(out)  # and round-trips exactly
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_hf_of_a_native_model(tmp_path):
  """The default rlhfjax model (sqrt(d) input scale, tied) exports as an untied Llama: same logits."""
  cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                          max_len=64)
  params = init_params(PolicyModel(cfg), jax.random.key(0))
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")
  save_hf(cfg, params, str(tmp_path / "out"), tokenizer=str(tok))
  assert (tmp_path / "out" / "tokenizer.json").exists()
  ids, mask = _batch()
  back = from_pretrained(str(tmp_path / "out"))
  assert back.config.model_type == "llama" and not back.config.tie_word_embeddings
  assert max_diff(hf_logits(back, ids, mask), our_logits(cfg, params, ids, mask), mask) <= ATOL


def test_load_sharded_checkpoint_onto_a_mesh(tmp_path):
  """A multi-file checkpoint (index.json) straight onto a 4-device mesh: the model's shardings, the
  same values as a host load, the same logits."""
  path = str(tmp_path / "llama")
  _hf_model("llama3").save_pretrained(path, max_shard_size="20KB")
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 2
  cfg, host = load_hf(path)
  mesh = create_mesh((1, 2, 2), jax.devices()[:4])
  cfg_m, sharded = load_hf(path, mesh=mesh)
  assert cfg_m == cfg
  want = logical_to_sharding(logical_specs(PolicyModel(cfg)), mesh)
  for got, w, h in zip(jax.tree.leaves(sharded), jax.tree.leaves(want), jax.tree.leaves(host)):
    assert got.sharding.is_equivalent_to(w, got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(h))
  wq = sharded["trunk"]["layers"]["attn"]["wq"]  # [layers, D, heads, head_dim] on (None, fsdp, tensor, None)
  assert wq.addressable_shards[0].data.shape == (2, 24, 3, 8)
  assert sharded["lm_head"].addressable_shards[0].data.shape == (24, 48)
  ids, mask = _batch()
  np.testing.assert_allclose(our_logits(cfg, sharded, ids, mask), our_logits(cfg, host, ids, mask), atol=1e-5)


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    c = json.load(f)
  c.update(changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(c, f)
  return dst


def _one_line_error(exc_type, match, fn, *args):
  with pytest.raises(exc_type, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value)


def test_one_line_errors(tmp_path):
  path = str(tmp_path / "llama")
  _hf_model("llama3").save_pretrained(path)
  _one_line_error(FileNotFoundError, "no such checkpoint directory", load_hf, str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  _one_line_error(FileNotFoundError, "no config.json", load_hf, str(tmp_path / "empty"))
  mistral = _edit_config(path, str(tmp_path / "mistral"), architectures=["MistralForCausalLM"],
                         model_type="mistral")
  _one_line_error(ValueError, r"unsupported checkpoint .*MistralForCausalLM.*supported: LlamaForCausalLM \(llama\), "
                  r"Qwen2ForCausalLM \(qwen2\), Qwen3ForCausalLM \(qwen3\), Gemma3ForCausalLM \(gemma3_text\)",
                  load_hf, mistral)
  yarn = _edit_config(path, str(tmp_path / "yarn"), rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                      "rope_theta": 10000.0})
  _one_line_error(ValueError, "rope type 'yarn' is not supported", load_hf, yarn)
  os.makedirs(tmp_path / "bin")
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "bin")
  _one_line_error(FileNotFoundError, r"no \*.safetensors weights", load_hf, str(tmp_path / "bin"))
  # a sharded checkpoint with a shard file gone, and one with a tensor gone
  sharded = str(tmp_path / "sharded")
  _hf_model("llama3").save_pretrained(sharded, max_shard_size="20KB")
  gone = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[-1]
  os.remove(os.path.join(sharded, gone))
  _one_line_error(FileNotFoundError, f"checkpoint file\\(s\\) missing: {gone}", load_hf, sharded)
  tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  _one_line_error(ValueError, "tensor model.layers.1.mlp.up_proj.weight is missing", load_hf, path)


def _gemma3_multimodal():
  """A tiny random Gemma3ForConditionalGeneration: the gemma3 text model above + a tiny SigLIP tower
  (image token ids outside the vocabulary: text-only inputs)."""
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                patch_size=8)
  cfg = transformers.Gemma3Config(text_config=FAMILIES["gemma3"](), vision_config=vision, mm_tokens_per_image=4,
                                  boi_token_index=V, eoi_token_index=V + 1, image_token_index=V + 2)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
  randomize(model)
  return model


def _rename_tensors(src, dst, rename):
  shutil.copytree(src, dst)
  tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  safetensors.numpy.save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
                              metadata={"format": "pt"})
  return dst


def test_gemma3_multimodal_loads_its_text_trunk(tmp_path, monkeypatch):
  """Both weight layouts (`language_model.model.*` as transformers 4.5x / 5.x save it, and
  `model.language_model.*`) load the text model with transformers' text logits, without reading a
  vision tensor; save_hf writes a text-only Gemma3ForCausalLM with the same logits."""
  model = _gemma3_multimodal()
  legacy = str(tmp_path / "legacy")
  model.save_pretrained(legacy)
  newer = _rename_tensors(legacy, str(tmp_path / "newer"), lambda k: "model." + k.replace(
      "language_model.model.", "language_model.") if not k.startswith("lm_head") else k)
  with safetensors.safe_open(os.path.join(newer, "model.safetensors"), "numpy") as f:
    names = list(f.keys())
  assert any(k.startswith("model.language_model.layers.") for k in names)
  assert any(k.startswith("model.vision_tower.") for k in names)
  ids, mask = _batch()
  ref = hf_logits(model, ids, mask)
  back = transformers.Gemma3ForConditionalGeneration.from_pretrained(newer, dtype=torch.float32,
                                                                     attn_implementation="eager").eval()
  assert max_diff(hf_logits(back, ids, mask), ref, mask) == 0.0  # transformers reads it as the same model
  real, read = safetensors.safe_open, []

  class Spy:  # safe_open that records which tensors are read
    def __init__(self, *a, **k):
      self.f = real(*a, **k)

    def __enter__(self):
      self.f.__enter__()
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

    def keys(self):
      return self.f.keys()

    def get_slice(self, name):
      read.append(name)
      return self.f.get_slice(name)

  monkeypatch.setattr(safetensors, "safe_open", Spy)
  loaded = {}
  for layout, path, prefix in (("legacy", legacy, "language_model.model."), ("newer", newer, "model.language_model.")):
    read.clear()
    cfg, params = loaded[layout] = load_hf(path)
    assert read and {k.partition(prefix)[0] for k in read} == {""}  # text tensors only
    assert max_diff(our_logits(cfg, params, ids, mask), ref, mask) <= ATOL
  cfg, params = loaded["legacy"]
  assert cfg == loaded["newer"][0] and cfg.tie_embeddings and cfg.has_local_layers
  monkeypatch.undo()
  out = str(tmp_path / "out")
  save_hf(cfg, params, out)
  text = from_pretrained(out)
  assert type(text).__name__ == "Gemma3ForCausalLM"
  assert max_diff(hf_logits(text, ids, mask), ref, mask) <= ATOL


def test_gemma3_multimodal_config_defaults():
  """Published multimodal checkpoints list in `text_config` only what differs from Gemma3TextConfig's
  defaults (gemma-3-4b's below): the same model as transformers' full text config."""
  sparse = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
  full = transformers.Gemma3Config(text_config=dict(sparse)).text_config.to_dict()
  ours = config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                         "text_config": sparse})
  assert ours == config_from_hf({**full, "architectures": ["Gemma3ForCausalLM"]})
  assert (ours.n_heads, ours.head_dim, ours.vocab_size, ours.layer_types[5]) == (8, 256, 262_208, "global")
