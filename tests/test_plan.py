"""Memory plan on the tiny model over the 8 fake devices: the state's bytes against a hand count,
the compiled update's argument bytes against that state, the verdict, and the presets' shapes."""

import json

import jax
import pytest

from rlhfjax import plan as mp


@pytest.fixture(scope="module")
def tiny_plan():
  from tests import tiny
  c = tiny.get_config()
  c.rl_loop.prompts_per_iter, c.rl.group_size, c.rl.minibatch_size = 2, 4, 8
  c.data.max_prompt_len, c.data.max_response_len = 8, 6
  c.model.dtype = c.model.param_dtype = "bfloat16"  # with micro-batches: the update once failed to trace
  c.rl.microbatch_size = 4
  return mp.plan(c, mp.parse_mesh("fsdp:8"), devices=jax.devices()[:8]), c


def test_state_bytes_are_the_hand_count_over_the_shards(tiny_plan):
  r, c = tiny_plan
  m = c.model
  d, f, heads, kv, hd, vocab = m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.head_dim, c.tokenizer.vocab_size
  per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f + 2 * d  # q, k, v, o, mlp, norms
  count = vocab * d + m.n_layers * per_layer + d  # tied embedding, layers, final norm
  assert r["params"] == r["reference"] == count * 2 // 8  # bfloat16, every leaf split 8 ways on embed
  assert r["optimizer"] == 2 * r["params"] + 8  # AdamW mu and nu, its step count and the schedule's
  assert r["critic"] == r["reward_model"] == 0  # GRPO: no critic; the rl stage: no reward model
  # XLA's own count of the update's inputs: the state, the experience the GRPO loss reads (B=8:
  # one row per device of 2 prompt and 4 response fields, 4-byte dtypes; old_values and returns
  # are unused, and so are old_logprobs on-policy (one epoch, one minibatch): jit drops them) and
  # 4 scalars (the step, the state's key, the KL coefficient, the iteration; the update's key is
  # unused too: one minibatch is not shuffled)
  upd = r["programs"]["rl_update"]
  assert c.rl.epochs == 1 and c.rl.minibatch_size == c.rl_loop.prompts_per_iter * c.rl.group_size
  experience = 4 * (2 * c.data.max_prompt_len + 4 * c.data.max_response_len)
  assert upd["argument"] == r["params"] + r["optimizer"] + experience + 4 + 8 + 4 + 4
  assert upd["alias"] >= r["params"] + r["optimizer"]  # the donated state is updated in place
  assert set(r["programs"]) == {"sampler", "make_experience", "rl_update"}
  assert r["peak"] == r["persistent"] + max(p["extra"] for p in r["programs"].values())
  assert all(p["temp"] > 0 for p in r["programs"].values())


def test_verdict_and_mesh_parsing(tiny_plan):
  r, _ = tiny_plan
  peak_gib = r["peak"] / mp.GIB
  assert "does not fit in" in mp.report(r, peak_gib / 2, "t")
  text = mp.report(r, peak_gib * 2, "t")
  assert "fits in" in text and "does not" not in text and "(50%)" in text
  assert mp.parse_mesh("fsdp:8") == (1, 8, 1) and mp.parse_mesh("data:2,tensor:4") == (2, 1, 4)
  with pytest.raises(ValueError, match="AXIS:SIZE"):
    mp.parse_mesh("fsdq:8")


def test_presets_have_the_published_sizes():
  from rlhfjax.models import PolicyModel
  from rlhfjax.models.hf import config_from_hf
  from rlhfjax.models.init import _dummy_inputs

  def count(name):
    shapes = jax.eval_shape(lambda: PolicyModel(config_from_hf(mp.PRESETS[name])).init(
        jax.random.key(0), *_dummy_inputs(4)))
    return sum(x.size for x in jax.tree.leaves(shapes))
  for name, hf in mp.PRESETS.items():  # each preset is a config.json the loader takes
    assert config_from_hf(hf).vocab_size == hf["vocab_size"], name
  # embed + untied head 2 x 128256 x 4096; 32 layers of q/o 4096^2, k/v 4096 x 1024, mlp 3 x 4096 x 14336
  # and two norms; the final norm
  assert count("llama3_8b") == 2 * 128256 * 4096 + 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 +
                                                         3 * 4096 * 14336 + 2 * 4096) + 4096 == 8_030_261_248


def test_hf_path_reads_only_config_json(tmp_path):
  from tests import tiny
  (tmp_path / "config.json").write_text(json.dumps(dict(mp.PRESETS["llama3_8b"], num_hidden_layers=3)))
  c = tiny.get_config()
  c.model.hf_path = str(tmp_path)  # a directory without weights or a tokenizer
  c.model.dtype = "bfloat16"
  cfg = mp.model_config(c)
  assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.n_kv_heads, cfg.param_dtype) == (
      4096, 3, 128256, 8, "bfloat16")
  assert (cfg.remat, cfg.remat_policy, cfg.attention) == (False, "full", "einsum")
  c.model.remat, c.model.attention = True, "dot_product"  # how to compute applies to a checkpoint too
  c.model.remat_policy = "dots"
  got = mp.model_config(c)
  assert (got.remat, got.remat_policy, got.attention) == (True, "dots", "dot_product")


def test_update_is_split_over_the_batch_on_data_parallel(monkeypatch):
  """The layout constraints (the shuffled minibatches, the activations) make `rl_update`'s
  temporaries on data:8 a fraction of the replicated update's (the same compile without them)."""
  from rlhfjax.train import rl
  from tests import tiny
  c = tiny.get_config()
  # two shuffled minibatches (one minibatch is not shuffled: its rows keep the input's layout)
  c.rl_loop.prompts_per_iter, c.rl.group_size, c.rl.minibatch_size = 2, 8, 8
  c.data.max_prompt_len, c.data.max_response_len = 8, 16
  temp = lambda: mp.plan(c, mp.parse_mesh("data:8"), devices=jax.devices()[:8],  # noqa: E731
                         programs=("rl_update",))["programs"]["rl_update"]["temp"]
  split = temp()
  monkeypatch.setattr(rl, "traced_in_layout", lambda fn, mesh, rules: fn)
  assert split < temp() / 4


def test_plan_with_shared_prompts_tis_and_a_bf16_sampler():
  """`plan` compiles the shared-prompt worst case (3 groups on data:2: rounded up to 4 rows, as
  `share_lengths` does), TIS (the rollout carries the sampler's log-probs) and a bf16 sampler."""
  from tests import tiny
  c = tiny.get_config()
  c.rl_loop.prompts_per_iter, c.rl.group_size, c.rl.minibatch_size = 3, 4, 12
  c.data.max_prompt_len, c.data.max_response_len = 8, 6
  c.rl.share_prompt, c.rl.tis_cap, c.rl_sampling.dtype = True, 2.0, "bfloat16"
  r = mp.plan(c, mp.parse_mesh("data:2"), devices=jax.devices()[:2])
  assert {"sampler", "make_experience", "rl_update"} <= set(r["programs"])
