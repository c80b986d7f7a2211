"""A few SFT steps on a 2x2x2 (data, fsdp, tensor) mesh equal the single-device run to 1e-5."""

import chex
import jax
import numpy as np

from rlhfjax.models import PolicyModel, TransformerConfig
from rlhfjax.parallel import axes, create_mesh, shard_batch
from rlhfjax.train.sft import SFTConfig, make_sft_step
from rlhfjax.train.state import create_train_state, make_optimizer

CFG = TransformerConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_len=16)


def _batches(n, b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(4, CFG.vocab_size, (b, t)).astype(np.int32)
    pad = rng.integers(0, 4, (b,))  # left padding
    mask = (np.arange(t)[None] >= pad[:, None]).astype(np.int32)
    loss_mask = ((np.arange(t)[None] >= pad[:, None] + 6) & (mask > 0)).astype(np.float32)
    out.append(dict(tokens=tokens * mask, mask=mask, loss_mask=loss_mask,
                    positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)))
  return out


def _run(mesh, batches):
  tx = make_optimizer(SFTConfig(learning_rate=1e-2, warmup_steps=1).optim(), total_steps=len(batches))
  state, shardings = create_train_state(PolicyModel(CFG), tx, jax.random.key(0), mesh,
                                        axes.DEFAULT_RULES)
  step = make_sft_step(CFG, tx, shardings, mesh, axes.DEFAULT_RULES)
  losses = []
  for b in batches:
    state, m = step(state, shard_batch(b, mesh))
    losses.append(float(m["loss"]))
  return state, losses


def test_sharded_sft_equals_single_device():
  assert len(jax.devices()) == 8
  batches = _batches(3)
  single, l1 = _run(create_mesh((1, 1, 1), jax.devices()[:1]), batches)
  mesh = create_mesh((2, 2, 2))
  sharded, l8 = _run(mesh, batches)
  # parameters really are distributed: the MLP kernel is split over fsdp x tensor
  w = sharded.params["trunk"]["layers"]["mlp"]["w_gate"]
  assert w.sharding.spec[1:] == ("fsdp", "tensor"), w.sharding.spec
  assert len({s.device for s in w.addressable_shards}) == 8
  assert w.addressable_shards[0].data.shape == (2, 16, 32)
  np.testing.assert_allclose(l1, l8, atol=1e-5)
  assert l1[-1] < l1[0]  # it trains
  chex.assert_trees_all_close(jax.device_get(single.params), jax.device_get(sharded.params), atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(single.opt_state), jax.device_get(sharded.opt_state),
                              atol=1e-5)
