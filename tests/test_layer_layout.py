"""The RL update's per-layer parameter layout and `Trunk`'s `out_from`: the same values and
gradients as the scan's stacked layout over every slot, the same AdamW decay mask, and the same
update (parameters, optimizer state, metrics) as the stacked path."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import rlhfjax.train.rl as rl_core
from rlhfjax.models import PolicyModel, TransformerConfig, ValueModel, init_params, positions_from_mask
from rlhfjax.models.sequence import response_token_stats, response_values
from rlhfjax.models.transformer import Trunk, map_trunks, stack_layers, unstack_layers
from rlhfjax.parallel import create_mesh
from rlhfjax.train.rl import AlgoConfig, RLOptimConfig
from rlhfjax.train.state import OptimConfig, TrainState, decay_mask, make_optimizer

BASE = TransformerConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                         d_ff=64, max_len=16)
CONFIGS = {
    "gqa": BASE,
    "remat_dots": dataclasses.replace(BASE, remat=True, remat_policy="dots"),
    # Gemma 3-like: local layers, qk norm, post norms, (1 + w) norms, scaled embedding, biases
    "gemma_local": dataclasses.replace(BASE, layer_types=("local", "global", "local"), sliding_window=3,
                                       qk_norm=True, post_norms=True, norm_plus_one=True,
                                       mlp_activation="gelu_tanh", qkv_bias=True, out_bias=True,
                                       rope_local_base=100.0, rope_scaling="linear",
                                       rope_scaling_factor=2.0),
    "dot_product": dataclasses.replace(BASE, attention="dot_product"),
}


def _inputs(b=3, t=10):
  rng = np.random.default_rng(0)
  mask = (np.arange(t)[None] >= np.array([0, 2, 4])[:b, None]).astype(np.int32)  # left padding
  tokens = jnp.asarray(rng.integers(1, 32, (b, t)) * mask, jnp.int32)
  mask = jnp.asarray(mask)
  return tokens, positions_from_mask(mask), mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("jit", [False, True])
def test_out_from_equals_the_full_forward_cut(name, jit):
  """Hidden states of slots >= k (both layouts) equal the scan's over every slot, cut at k; so do
  the gradients of a loss on them (the per-layer ones stacked back)."""
  cfg = CONFIGS[name]
  trunk = Trunk(cfg)
  tokens, positions, mask = _inputs()
  params = trunk.init(jax.random.key(1), tokens, positions, mask)["params"]
  per_layer = unstack_layers(params)
  k = 4
  w = 0.1 * jax.random.normal(jax.random.key(2), (3, 10 - k, cfg.d_model))  # gradients O(1)

  def loss(p, out_from):
    h = trunk.apply({"params": p}, tokens, positions, mask, out_from=out_from)[0]
    h = h[:, k - out_from:]
    return jnp.sum(jnp.tanh(h) * w), h

  grad = jax.value_and_grad(loss, has_aux=True)
  if jit:
    grad = jax.jit(grad, static_argnums=1)
  (ref_loss, ref_h), ref_g = grad(params, 0)
  for p in (params, per_layer):
    (l, h), g = grad(p, k)
    assert h.shape == (3, 10 - k, cfg.d_model)
    np.testing.assert_allclose(h, ref_h, atol=1e-5)
    np.testing.assert_allclose(l, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close({**g, "layers": stack_layers(g)["layers"]}, ref_g, atol=1e-5, rtol=1e-5)


def test_out_from_cuts_the_last_layer_only():
  """With per-layer parameters the last layer's MLP runs on the kept slots only: a change to an
  earlier slot's last-layer output cannot reach the result (its MLP input is never built), while
  the same change in an earlier layer does."""
  cfg = BASE
  trunk = Trunk(cfg)
  tokens, positions, mask = _inputs()
  per_layer = unstack_layers(trunk.init(jax.random.key(1), tokens, positions, mask)["params"])
  shapes = []

  def spy(next_fun, args, kwargs, context):
    if context.module.name == "mlp":
      shapes.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    trunk.apply({"params": per_layer}, tokens, positions, mask, out_from=6)
  assert shapes == [(3, 10, cfg.d_model)] * (cfg.n_layers - 1) + [(3, 4, cfg.d_model)]


def test_out_from_refused_with_a_cache():
  model = PolicyModel(BASE)
  tokens, positions, mask = _inputs()
  params = init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match="out_from is for the no-cache forward"):
    model.apply({"params": params}, tokens, positions, mask, model.init_cache(3, 12), 0, 2)


def test_response_stats_take_the_predicting_columns_only():
  """`response_token_stats` / `response_values` (which pass `out_from` to the built-in modules)
  equal the full forward's logits and values cut to the predicting columns."""
  cfg = BASE
  policy, critic = PolicyModel(cfg), ValueModel(cfg)
  pp, vp = init_params(policy, jax.random.key(0)), init_params(critic, jax.random.key(1))
  rng = np.random.default_rng(3)
  pmask = jnp.asarray((np.arange(5)[None] >= np.array([0, 1, 3])[:, None]).astype(np.int32))
  rmask = jnp.asarray((np.arange(6)[None] < np.array([6, 2, 4])[:, None]).astype(np.float32))
  pids = jnp.asarray(rng.integers(1, 32, (3, 5)), jnp.int32) * pmask
  rids = jnp.asarray(rng.integers(1, 32, (3, 6)), jnp.int32) * rmask.astype(jnp.int32)
  tokens = jnp.concatenate([pids, rids], 1)
  mask = jnp.concatenate([pmask, rmask.astype(jnp.int32)], 1)
  positions = positions_from_mask(mask)
  logits = policy.apply({"params": pp}, tokens, positions, mask)[0][:, 4:10]
  ref_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), rids[..., None], -1)[..., 0]
  ref_v = critic.apply({"params": vp}, tokens, positions, mask)[:, 4:10]
  for layout in (lambda p: p, lambda p: map_trunks(unstack_layers, p)):
    lp, _, _ = response_token_stats(layout(pp), policy, pids, pmask, rids, rmask)
    np.testing.assert_allclose(lp, ref_lp, atol=1e-5)
    np.testing.assert_allclose(response_values(layout(vp), critic, pids, pmask, rids, rmask), ref_v,
                               atol=1e-5)


def test_map_trunks_round_trips_a_train_state():
  """Parameters and AdamW moments alike go per-layer and back exactly; other leaves untouched."""
  params = init_params(PolicyModel(BASE), jax.random.key(0))
  tx = make_optimizer(OptimConfig(weight_decay=0.1), 10)
  ts = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  rng=jax.random.key(0))
  per_layer = map_trunks(unstack_layers, ts)
  mu = per_layer.opt_state[1][0].mu  # clip, then adamw's chain: scale_by_adam's state
  assert len(mu["trunk"]["layers"]["unstacked"]) == BASE.n_layers
  assert per_layer.params["trunk"]["layers"]["unstacked"][1]["mlp"]["w_up"].shape == (32, 64)
  chex.assert_trees_all_equal(map_trunks(stack_layers, per_layer), ts)


def test_decay_mask_is_the_same_in_either_layout():
  """The AdamW decay mask of the per-layer layout is the stacked layout's, leaf for leaf: every
  layer parameter decays (stacked, a norm scale is [layers, d]: the mask as it always was), the
  embedding too, the final norm's scale not."""
  cfg = dataclasses.replace(BASE, qkv_bias=True, tie_embeddings=False)
  params = init_params(PolicyModel(cfg), jax.random.key(0))
  mask = decay_mask(params)
  assert mask["trunk"]["embedding"] and mask["lm_head"] and not mask["trunk"]["final_norm"]["scale"]
  layers = mask["trunk"]["layers"]
  assert all(jax.tree.leaves(layers))
  assert jax.tree.leaves(layers) == [jnp.ndim(p) >= 2 for p in jax.tree.leaves(params["trunk"]["layers"])]
  split = decay_mask(map_trunks(unstack_layers, params))
  for layer in split["trunk"]["layers"]["unstacked"]:
    chex.assert_trees_all_equal(layer, layers)
  assert {k: v for k, v in split.items() if k != "trunk"} == {k: v for k, v in mask.items() if k != "trunk"}


@pytest.mark.parametrize("case", ["ppo", "ppo_shared_trunk", "grpo"])
def test_update_in_the_per_layer_layout_equals_the_stacked_update(case, rl_loop, tiny_cfg, monkeypatch):
  """Two iterations of the jitted update (2 epochs x 2 minibatches for PPO, weight decay on) with
  `rl.per_layer_update` (the per-layer layout and `out_from`) give the parameters, optimizer state
  and metrics of the stacked path over every slot."""
  algo = {"ppo": AlgoConfig(algo="ppo", group_size=1, minibatch_size=8, epochs=2),
          "ppo_shared_trunk": AlgoConfig(algo="ppo", group_size=1, minibatch_size=8, epochs=2,
                                         shared_trunk=True),
          "grpo": AlgoConfig(algo="grpo", group_size=4, minibatch_size=16)}[case]
  optim = RLOptimConfig(learning_rate=1e-3, value_learning_rate=1e-3, warmup_steps=0, weight_decay=0.1)
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  old, m_old = rl_loop(algo, mesh, optim=optim)
  split = []  # did the update really go per layer: the trees map_trunks made
  real = rl_core.map_trunks
  monkeypatch.setattr(rl_core, "map_trunks", lambda fn, tree: split.append(real(fn, tree)) or split[-1])
  new, m_new = rl_loop(dataclasses.replace(algo, per_layer_update=True), mesh, optim=optim)
  monkeypatch.setattr(rl_core, "map_trunks", real)
  layers = split[0].policy.params["trunk"]["layers"]
  assert len(layers["unstacked"]) == tiny_cfg.n_layers
  assert len(split[0].policy.opt_state[-1][0].mu["trunk"]["layers"]["unstacked"]) == tiny_cfg.n_layers
  chex.assert_trees_all_equal_structs(new, old)
  for a, b in ((new.policy, old.policy), (new.value, old.value)):  # params, AdamW moments, steps
    if a is not None:
      chex.assert_trees_all_close((a.params, a.opt_state, a.step), (b.params, b.opt_state, b.step),
                                  atol=1e-5)
  chex.assert_trees_all_close(m_new, m_old, atol=1e-5, rtol=1e-5)
  # the update moved the parameters (the comparison is not between two unchanged states)
  p0 = init_params(PolicyModel(tiny_cfg), jax.random.key(0))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), p0,
                       {k: v for k, v in new.policy.params.items() if k != "value_head"})
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_response_stats_of_a_module_without_out_from():
  """A policy module that does not take `out_from` (its own `(logits, aux)` output, an aux that is
  not per column) gets the full forward, its logits cut to the predicting columns; N = 0 gives none."""
  import flax.linen as nn

  class Wrapped(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens, positions, mask):
      return PolicyModel(self.cfg, name="inner")(tokens, positions, mask)[0], jnp.zeros(())

  cfg = BASE
  model = Wrapped(cfg)
  params = init_params(model, jax.random.key(0))
  inner = params["inner"]
  pmask = jnp.ones((2, 4), jnp.int32)
  pids = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)
  rids, rmask = jnp.asarray([[11, 12, 13], [14, 15, 16]], jnp.int32), jnp.ones((2, 3))
  lp, _, _ = response_token_stats(params, model, pids, pmask, rids, rmask)
  ref, _, _ = response_token_stats(inner, PolicyModel(cfg), pids, pmask, rids, rmask)
  np.testing.assert_allclose(lp, ref, atol=1e-5)
  lp0, _, _ = response_token_stats(params, model, pids, pmask, rids[:, :0], rmask[:, :0])
  assert lp0.shape == (2, 0)
  critic = ValueModel(cfg)  # takes out_from: P - 1 leaves one column, cut to none
  assert response_values(init_params(critic, jax.random.key(1)), critic, pids, pmask, rids[:, :0],
                         rmask[:, :0]).shape == (2, 0)
