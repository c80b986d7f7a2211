"""Memory plan: does a config's RL stage fit a slice? Per-device bytes from abstract shapes; no weights.

    python -m rlhfjax.plan --config=grpo_arith --mesh=data:1,fsdp:8,tensor:1 --hbm_gib=80
    python -m rlhfjax.plan --config=grpo_arith --preset=llama3_8b --mesh=fsdp:8 --config.model.dtype=bfloat16
    python -m rlhfjax.plan --config=hf_grpo --config.model.hf_path=DIR --mesh=fsdp:8  # reads config.json only

The persistent state (policy parameters, optimizer state, the frozen reference, PPO's critic, the
`ppo` stage's reward model) is `jax.eval_shape` of its init with the stage's shardings
(`rl_state_shardings`): exact bytes per device. The stage's three programs (the sampler
`generate`, `make_experience`, `rl_update`) are lowered on `jax.ShapeDtypeStruct`s carrying those
shardings and compiled ahead of time — over fake CPU devices when the mesh needs more devices than
there are — and `memory_analysis()` gives, per device, each one's temporaries and its outputs not
aliased to (donated) inputs. Peak = persistent state + the largest program's extra (temporaries,
unaliased outputs and inputs that are not state, e.g. the rollout). On a CPU these come from
XLA:CPU's fusion and buffer assignment (which also computes bfloat16 in float32), not TPU's or GPU's:
the state bytes are exact, the temporaries an estimate of the accelerator's.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types

from absl import app, flags
from ml_collections import config_flags

from rlhfjax.config import resolve_argv

MESH_AXES = ("data", "fsdp", "tensor")  # = rlhfjax.parallel.axes.MESH_AXES (importing it loads JAX)
GIB = 2 ** 30

# config.json fields (Hugging Face layout) of published models, for `--preset`.
PRESETS = {
    "llama3_8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3_8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, num_hidden_layers=36, vocab_size=151936,
                     rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     tie_word_embeddings=False),
    "qwen2.5_1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, num_hidden_layers=28, vocab_size=151936, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "gemma3_1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, num_hidden_layers=26, vocab_size=262144,
                      rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window=512,
                      sliding_window_pattern=6, query_pre_attn_scalar=256, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh"),
}


def parse_mesh(spec: str) -> tuple[int, ...]:
  """`"data:2,fsdp:4"` -> (2, 4, 1): sizes of ("data", "fsdp", "tensor"), unnamed axes 1."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, spec.replace(" ", "").split(",")):
    name, _, n = part.partition(":")
    if name not in sizes or not n.isdigit() or int(n) < 1:
      raise ValueError(f"--mesh: {part!r} is not AXIS:SIZE with AXIS one of {MESH_AXES}")
    sizes[name] = int(n)
  return tuple(sizes.values())


def model_config(config, preset: str = ""):
  """The policy's TransformerConfig as the pipeline builds it; a preset or `model.hf_path` is read
  from its config.json alone (no weights, no tokenizer: the vocabulary is the model's)."""
  from rlhfjax.models.hf import config_from_hf, read_hf_config
  from rlhfjax.train.pipeline import compute_options, make_model_config
  path, dtype = config.model.get("hf_path", ""), config.model.get("dtype", "float32")
  if preset or path:
    return compute_options(config_from_hf(PRESETS[preset] if preset else read_hf_config(path), dtype,
                                          where=preset or os.path.join(path, "config.json")), config.model)
  return make_model_config(config, types.SimpleNamespace(vocab_size=config.tokenizer.vocab_size))


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


PROGRAMS = ("sampler", "make_experience", "rl_update")


def plan(config, mesh_shape, *, stage: str = "rl", preset: str = "", devices=None,
         programs=PROGRAMS) -> dict:
  """Per-device bytes of `stage`'s state and `programs` on a `mesh_shape` mesh (see the module doc):
  {"model_cfg", "params", ..., "programs": {name: memory_analysis fields + "extra", "compile_s"},
  "persistent", "peak"}."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models.heads import RewardModel
  from rlhfjax.parallel import batch_sharding, create_mesh, replicated
  from rlhfjax.sampling import Rollout, SamplingConfig, generate
  from rlhfjax.train.rl import (experience_shardings, make_experience_fn, make_rl_update,
                                rl_state_shardings)
  from rlhfjax.train.rl_stage import builtin_models, rl_configs, sampler_model
  from rlhfjax.train.state import state_shardings
  algo, optim, sampling, loop = rl_configs(config)
  cfg = model_config(config, preset)
  devices = list(devices or jax.devices())
  if len(devices) < math.prod(mesh_shape):
    devices = jax.devices("cpu")
  mesh = create_mesh(mesh_shape, devices[:math.prod(mesh_shape)])
  rules = tuple(tuple(r) for r in config.sharding.rules)
  sds = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),  # noqa: E731
                                      tree, sh)
  models = builtin_models(cfg, algo)
  ptx, vtx = optim.optimizers(loop.iterations * algo.epochs)
  abstract, shardings = rl_state_shardings(models, algo, ptx, vtx, mesh, rules)
  state = sds(abstract, shardings)
  ref = {k: v for k, v in state.policy.params.items() if k != "value_head"}
  out = dict(model_cfg=cfg, mesh_shape=tuple(mesh_shape), params=device_bytes(state.policy.params),
             optimizer=device_bytes(state.policy.opt_state), reference=device_bytes(ref),
             critic=device_bytes(state.value), reward_model=0, programs={})
  if stage == "ppo":
    rm = config.get("rm")
    ensemble = int(rm.ensemble_size) if rm is not None else 1
    rm_params = sds(*state_shardings(RewardModel(cfg, rm.pool if rm else "last"), ptx, mesh, rules)).params
    out["reward_model"] = ensemble * device_bytes(rm_params)
  b = loop.prompts_per_iter * algo.group_size
  p, n = config.data.max_prompt_len, sampling.max_new_tokens or config.data.max_response_len
  batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules))  # noqa: E731
  rep = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh))  # noqa: E731
  rng = rep(jax.eval_shape(lambda: jax.random.key(0)))

  def compile_(name, fn, args, state_args, **kw):
    t0 = time.perf_counter()
    lowered = fn.lower(*args, **kw)
    if name not in programs:
      return lowered
    ma = lowered.compile().memory_analysis()
    fields = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    fields["extra"] = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"] - device_bytes(state_args)
    out["programs"][name] = dict(fields, compile_s=time.perf_counter() - t0)
    return lowered

  sampler = SamplingConfig(model=sampler_model(models.policy, sampling.dtype), max_new_tokens=n,
                           eos_id=1, pad_id=0, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, layout=(mesh, rules))
  ids = batch((b, p), jnp.int32)
  compile_("sampler", generate, (state.policy.params, ids, ids, rng), state.policy.params, config=sampler)
  packing = None
  if algo.packs:  # the worst case: one row per sequence (per group with share_prompt), all full
    from rlhfjax.models.sequence import Packing
    from rlhfjax.train.rl import batch_shards
    shards = batch_shards(b, mesh, rules)  # share_lengths rounds the groups up to a multiple
    groups = -(-(b // algo.group_size) // shards) * shards
    rows = (b, p + n) if algo.pack else (groups, p - 1 + algo.group_size * n)
    packing = Packing(src=rep(jax.ShapeDtypeStruct(rows, jnp.int32)),
                      dst=rep(jax.ShapeDtypeStruct((b, n), jnp.int32)),
                      segments=rep(jax.ShapeDtypeStruct(rows, jnp.int32)))
  rollout = Rollout(prompt_ids=ids, prompt_mask=ids, response_ids=batch((b, n), jnp.int32),
                    response_mask=batch((b, n), jnp.float32), finished=batch((b,), jnp.bool_),
                    packing=packing, logprobs=batch((b, n), jnp.float32))
  vparams = state.value.params if algo.separate_critic else None
  exp_fn = make_experience_fn(algo, models, mesh, rules, temperature=sampling.temperature)
  lowered = compile_("make_experience", exp_fn, (state.policy.params, ref, vparams, rollout,
                                                 rep(jax.ShapeDtypeStruct((b,), jnp.float32)), state.kl.value),
                     (state.policy.params, ref, vparams))
  exp = sds(lowered.out_info[0], experience_shardings(mesh, rules, algo.packs))
  if loop.update_variant == "shard_map":  # as RLStage.start picks it
    from rlhfjax.train.rl_shard_map import make_rl_update_shard_map as make_rl_update
  update = make_rl_update(algo, models, ptx, vtx, shardings, mesh, rules, temperature=sampling.temperature)
  compile_("rl_update", update, (state, exp, rng), state)
  out["persistent"] = sum(out[k] for k in ("params", "optimizer", "reference", "critic", "reward_model"))
  out["peak"] = out["persistent"] + max(p["extra"] for p in out["programs"].values())
  return out


def report(r: dict, hbm_gib: float, title: str) -> str:
  """The printed plan: GiB per device of each part, the peak, and whether it fits in `hbm_gib`."""
  cfg, (data, fsdp, tensor) = r["model_cfg"], r["mesh_shape"]
  unit, scale = ("GiB", GIB) if r["peak"] >= GIB else ("MiB", 2 ** 20)
  lines = [title, f"  mesh data={data} fsdp={fsdp} tensor={tensor}; d_model={cfg.d_model} layers={cfg.n_layers} "
           f"vocab={cfg.vocab_size}; parameters {cfg.param_dtype}, compute {cfg.dtype}", f"  {unit} per device"]
  parts = [(r["params"], "policy parameters"), (r["optimizer"], "optimizer state"),
           (r["reference"], "reference parameters"), (r["critic"], "critic (parameters + optimizer state)"),
           (r["reward_model"], "reward model parameters")]
  parts += [(p["extra"], f"{name}: temporaries + outputs (compiled in {p['compile_s']:.0f} s)")
            for name, p in r["programs"].items()]
  lines += [f"  {b / scale:9.3f}  {name}" for b, name in parts + [(r["peak"], "peak: the state + the largest program")]]
  verdict = "fits" if r["peak"] <= hbm_gib * GIB else "does not fit"
  return "\n".join(lines + [f"  {verdict} in {hbm_gib:g} GiB ({100 * r['peak'] / (hbm_gib * GIB):.0f}%)"])


def _cli():
  """`python -m rlhfjax.plan` (flags defined here, so importing this module defines none)."""
  config_flag = config_flags.DEFINE_config_file("config", None, "experiment name or config file path",
                                                lock_config=True)
  flags.DEFINE_string("mesh", "data:1,fsdp:8,tensor:1", "mesh axis sizes, e.g. fsdp:8 (others 1)")
  flags.DEFINE_float("hbm_gib", 80.0, "accelerator memory per device (GiB)")
  flags.DEFINE_enum("stage", "rl", ["rl", "ppo"], "the RL stage to plan")
  flags.DEFINE_enum("preset", "", ["", *PRESETS], "a published model's shape instead of config.model")
  flags.mark_flags_as_required(["config"])
  f = flags.FLAGS

  def main(argv):
    del argv
    shape = parse_mesh(f.mesh)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "jax" not in sys.modules:  # fake CPU devices for a mesh larger than this machine
      flag = f"--xla_force_host_platform_device_count={math.prod(shape)}"
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    config = config_flag.value
    r = plan(config, shape, stage=f.stage, preset=f.preset)
    b = config.rl_loop.prompts_per_iter * config.rl.group_size
    n = config.rl_sampling.max_new_tokens or config.data.max_response_len
    print(report(r, f.hbm_gib, f"memory plan: {f.stage} ({config.rl.algo}) on "
                 f"{f.preset or config.model.get('hf_path') or 'config.model'}, {b} sequences of "
                 f"{config.data.max_prompt_len} + {n} tokens"), flush=True)

  sys.argv = resolve_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  _cli()
