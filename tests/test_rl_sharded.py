"""The RL math jitted with the batch sharded over 8 CPU devices equals the one-device result."""

import chex
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhfjax import rl


def experience_and_loss(rewards, values, logprobs, old_logprobs, mask):
  adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
  adv = rl.whiten(adv, mask)

  def loss_fn(lp):
    return rl.ppo_policy_loss(lp, old_logprobs, adv, mask, clip_eps=0.2, aggregation="sequence")

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logprobs)
  vf, _ = rl.value_loss(values + 0.1, values, ret, mask, clip=0.2)
  return adv, ret, loss, vf, metrics, grad


def test_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  shape = (16, 10)
  mask = np.zeros(shape, np.float32)
  for b in range(shape[0]):
    left = rng.integers(0, 4)
    mask[b, left:left + rng.integers(0, shape[1] - left + 1)] = 1.0
  old = np.log(rng.uniform(0.1, 0.9, size=shape)).astype(np.float32)
  args = (rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32),
          old + rng.normal(0, 0.3, size=shape).astype(np.float32), old, mask)
  expected = jax.jit(experience_and_loss)(*args)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data", None))
  sharded_args = jax.device_put(args, batch)
  got = jax.jit(experience_and_loss, in_shardings=(batch,) * 5)(*sharded_args)
  assert got[0].sharding.num_devices == 8
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
