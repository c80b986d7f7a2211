"""The reward step: one forward per response, 2x2x2 mesh == one device, vmapped ensemble == N
separate models, normalization to mean 0 / std 1, the scoring API."""

import chex
import jax
import numpy as np
import pytest

from rlhfjax.models import TransformerConfig
from rlhfjax.models.init import positions_from_mask
from rlhfjax.parallel import axes, create_mesh, shard_batch
from rlhfjax.train import reward
from rlhfjax.rewards.scorers import ensemble_score, make_scorer, score
from rlhfjax.train.reward import (LossConfig, RMConfig, create_reward_state, make_reward_step,
                                  normalize_params)
from rlhfjax.train.state import make_optimizer

CFG = TransformerConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_len=16)
RULES = axes.DEFAULT_RULES


def _batches(n, b=8, k=3, t=16, seed=0):
  """Comparison batches [B, K, T]: left-padded prompt (6 slots) | right-padded response."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(4, CFG.vocab_size, (b, k, t)).astype(np.int32)
    pad = rng.integers(0, 3, (b, k, 1))
    length = rng.integers(2, 10, (b, k, 1))
    cols = np.arange(t)[None, None]
    mask = ((cols >= pad) & (cols < 6 + length)).astype(np.int32)
    valid = np.ones((b, k), np.float32)
    valid[0, -1] = 0
    out.append(dict(tokens=tokens * mask, mask=mask, valid=valid,
                    positions=np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32),
                    margin=rng.uniform(0, 1, b).astype(np.float32)))
  return out


def _tx(steps=3):
  return make_optimizer(RMConfig(learning_rate=1e-2, warmup_steps=1).optim(), total_steps=steps)


def _trunk():
  from rlhfjax.models import PolicyModel, init_params
  return init_params(PolicyModel(CFG), jax.random.key(42))["trunk"]


def _trainer(mesh, n_steps, *, n=None, loss_cfg=LossConfig(margin_coef=0.5, center_coef=0.01)):
  """train(batches, rng, trunk=None) -> (state, losses [steps] or [steps, N]); one compile per trainer."""
  tx = _tx(n_steps)
  _, shardings = reward.reward_state_shardings(CFG, tx, mesh, RULES, n)
  step = make_reward_step(CFG, tx, loss_cfg, shardings, mesh, RULES, ensemble=n is not None)

  def train(batches, rng, trunk=None):
    state, _ = create_reward_state(CFG, tx, rng, mesh, RULES, trunk=trunk, n=n)
    losses = []
    for b in batches:
      state, m = step(state, shard_batch(b, mesh))
      losses.append(np.asarray(m["loss"]))
    return state, np.stack(losses)
  return train


def _train(mesh, batches, rng, **kw):
  trunk = kw.pop("trunk", None)
  return _trainer(mesh, len(batches), **kw)(batches, rng, trunk)


def test_ranking_step_scores_each_response_once(monkeypatch):
  """K responses per ranking -> B*K sequences through ONE forward, not K(K-1) per ranking."""
  traced, rows = [], []
  real = reward.reward_forward

  def counting_forward(params, tokens, positions, mask, model_cfg, pool="last"):
    traced.append(tokens.shape)
    jax.debug.callback(lambda n: rows.append(int(n)), tokens.shape[0])
    return real(params, tokens, positions, mask, model_cfg, pool)

  monkeypatch.setattr(reward, "reward_forward", counting_forward)
  b, k = 4, 4
  batch = _batches(1, b=b, k=k)[0]
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  state, _ = _train(mesh, [batch, batch], jax.random.key(0))
  assert traced == [(b * k, 16)]  # traced once, one forward over all B*K responses
  assert rows == [b * k, b * k]  # each step scored B*K = 16 rows (not B*K*(K-1) = 48)


def test_sharded_step_equals_single_device():
  assert len(jax.devices()) == 8
  batches = _batches(3)
  trunk = _trunk()
  single, l1 = _train(create_mesh((1, 1, 1), jax.devices()[:1]), batches, jax.random.key(0), trunk=trunk)
  sharded, l8 = _train(create_mesh((2, 2, 2)), batches, jax.random.key(0), trunk=trunk)
  w = sharded.params["trunk"]["layers"]["mlp"]["w_gate"]
  assert w.sharding.spec[1:] == ("fsdp", "tensor"), w.sharding.spec
  np.testing.assert_allclose(l1, l8, atol=1e-5)
  assert l1[-1] < l1[0]
  chex.assert_trees_all_close(jax.device_get(single.params), jax.device_get(sharded.params), atol=1e-5)
  # the SFT trunk was transplanted and the norm gain/bias were not trained
  assert float(single.params["norm_gain"]) == 1.0 and float(single.params["norm_bias"]) == 0.0


def test_vmapped_ensemble_equals_separate_models():
  n = 3
  batches = _batches(3, seed=1)
  rng = jax.random.key(5)
  loss_cfg = LossConfig(center_coef=0.01, bootstrap=True)  # members see different bootstrap weights
  ens, le = _train(create_mesh((2, 2, 2)), batches, rng, n=n, loss_cfg=loss_cfg)
  assert le.shape == (3, n)
  separate = _trainer(create_mesh((1, 1, 1), jax.devices()[:1]), len(batches), loss_cfg=loss_cfg)
  for i, member_rng in enumerate(jax.random.split(rng, n)):
    single, ls = separate(batches, member_rng)
    np.testing.assert_allclose(le[:, i], ls, atol=1e-5)
    member = jax.tree.map(lambda x: x[i], jax.device_get(ens.params))
    chex.assert_trees_all_close(member, jax.device_get(single.params), atol=1e-5)
  assert not np.allclose(le[:, 0], le[:, 1])  # members really differ


def _sequences(m=64, t=16, seed=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CFG.vocab_size, (m, t)).astype(np.int32)
  pad = rng.integers(0, 4, (m, 1))
  end = rng.integers(8, t + 1, (m, 1))
  cols = np.arange(t)[None]
  mask = ((cols >= pad) & (cols < end)).astype(np.int32)
  return tokens * mask, mask


@pytest.mark.parametrize("pool", ["last", "sum"])
def test_normalization_mean0_std1_and_scoring_api(pool):
  tokens, mask = _sequences()
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  state, _ = create_reward_state(CFG, _tx(), jax.random.key(0), mesh, RULES)
  params, before = normalize_params(state.params, tokens, mask, CFG, batch_size=16, pool=pool)
  s = np.asarray(score(params, tokens, mask, model_cfg=CFG, pool=pool))
  assert abs(before["std"] - 1.0) > 1e-3  # it really changed something
  np.testing.assert_allclose([s.mean(), s.std()], [0.0, 1.0], atol=1e-4)
  # normalizing again is a no-op; make_scorer binds the config: score(params, tokens, mask)
  again, _ = normalize_params(params, tokens, mask, CFG, pool=pool)
  np.testing.assert_allclose(make_scorer(CFG, pool=pool)(again, tokens, mask), s, atol=1e-4)
  # score == the model's own forward with explicit positions
  np.testing.assert_allclose(s, reward.reward_forward(params, tokens, positions_from_mask(mask), mask, CFG,
                                                      pool), atol=1e-5)
  if pool == "sum":  # a per-token reward: the prompt's part is the same for every continuation
    cut = tokens.copy(), mask.copy()
    cut[1][:, 12:] = 0
    from rlhfjax.models import RewardModel
    _, raw = RewardModel(CFG).apply({"params": params}, tokens, positions_from_mask(mask), mask,
                                    per_token=True)
    head = np.sum(np.asarray(raw)[:, :12] * mask[:, :12], 1)
    short = np.asarray(score(params, *cut, model_cfg=CFG, pool=pool))
    np.testing.assert_allclose(short, params["norm_gain"] * head + params["norm_bias"], atol=1e-4)


def test_ensemble_normalization_and_uncertainty():
  tokens, mask = _sequences(seed=4)
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  state, _ = create_reward_state(CFG, _tx(), jax.random.key(1), mesh, RULES, n=3)
  params, _ = normalize_params(state.params, tokens, mask, CFG, ensemble=True)
  out = ensemble_score(params, tokens, mask, 0.5, model_cfg=CFG)
  members = np.asarray(out["members"])
  assert members.shape == (3, 64)
  np.testing.assert_allclose(members.mean(1), 0.0, atol=1e-4)
  np.testing.assert_allclose(members.std(1), 1.0, atol=1e-4)
  np.testing.assert_allclose(out["mean"], members.mean(0), atol=1e-6)
  np.testing.assert_allclose(out["std"], members.std(0), atol=1e-6)
  np.testing.assert_allclose(out["penalized"], members.mean(0) - 0.5 * members.std(0), atol=1e-6)
  pen = make_scorer(CFG, ensemble=True, uncertainty_coef=0.5)(params, tokens, mask)
  np.testing.assert_allclose(pen, out["penalized"], atol=1e-6)
  assert float(np.mean(out["std"])) > 0  # members disagree (different head inits)


def test_score_sharded_batch():
  tokens, mask = _sequences(seed=5)
  mesh = create_mesh((-1, 1, 1))
  state, _ = create_reward_state(CFG, _tx(), jax.random.key(0), mesh, RULES)
  batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
  s = score(state.params, batch["tokens"], batch["mask"], model_cfg=CFG)
  assert len(s.sharding.device_set) == 8  # stays sharded over the batch
  ref = score(jax.device_get(state.params), tokens, mask, model_cfg=CFG)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref), atol=1e-5)
