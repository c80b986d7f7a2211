"""DPO / cDPO / IPO losses vs NumPy and hand-computed values (jitted and not), their gradient
direction, the sequence log-probs and pair weighting, the sharded step == single device, and the
`dpo` stage end to end (sft,dpo; then dpo alone on that workdir's sft checkpoint)."""

import functools
import json
import math
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(jit, *args, weights=None, **static):
  f = lambda *a, w: rl.dpo_loss(*a, weights=w, **static)  # noqa: E731
  return (jax.jit(f) if jit else f)(*args, w=weights)


def dpo_ref(c, r, rc, rr, beta, loss_type="sigmoid", eps=0.0, w=None):
  """A plain NumPy loop over the pairs."""
  w = np.ones(len(c)) if w is None else w
  losses, rew_c, rew_r = [], [], []
  for i in range(len(c)):
    h = (c[i] - r[i]) - (rc[i] - rr[i])
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    losses.append(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h) if loss_type == "sigmoid"
                  else (h - 1 / (2 * beta)) ** 2)
    rew_c.append(beta * (c[i] - rc[i]))
    rew_r.append(beta * (r[i] - rr[i]))
  mean = lambda x: float(np.sum(np.asarray(x) * w) / np.sum(w))  # noqa: E731
  return {"loss": mean(losses), "rewards_chosen": mean(rew_c), "rewards_rejected": mean(rew_r),
          "reward_accuracy": mean(np.asarray(rew_c) > np.asarray(rew_r)),
          "reward_margin": mean(np.asarray(rew_c) - np.asarray(rew_r)), "logps_chosen": mean(c),
          "logps_rejected": mean(r)}


@JIT
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_losses_match_numpy(jit, loss_type, eps):
  rng = np.random.default_rng(0)
  c, r, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
  w = rng.integers(0, 3, 16).astype(np.float32)  # 0 drops a pair
  _, m = call(jit, c, r, rc, rr, weights=w, beta=0.3, loss_type=loss_type, label_smoothing=eps)
  want = dpo_ref(c, r, rc, rr, 0.3, loss_type, eps, w)
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


@JIT
def test_hand_computed_values(jit):
  # h = (−1 − −3) − (−2 − −2) = 2; β = 0.5: βh = 1
  args = [jnp.asarray([x]) for x in (-1.0, -3.0, -2.0, -2.0)]
  loss, m = call(jit, *args, beta=0.5)
  np.testing.assert_allclose(loss, math.log(1 + math.exp(-1)), rtol=1e-6)  # −log σ(1) = 0.3133
  np.testing.assert_allclose([m["rewards_chosen"], m["rewards_rejected"], m["reward_margin"],
                              m["reward_accuracy"]], [0.5, -0.5, 1.0, 1.0], rtol=1e-6)
  loss, _ = call(jit, *args, beta=0.5, label_smoothing=0.25)  # 0.75·softplus(−1) + 0.25·softplus(1)
  np.testing.assert_allclose(loss, 0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e),
                             rtol=1e-6)
  loss, _ = call(jit, *args, beta=0.5, loss_type="ipo")  # (h − 1/(2β))² = (2 − 1)²
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    rl.dpo_loss(*args, loss_type="simpo")


def test_gradient_raises_chosen_lowers_rejected():
  rng = np.random.default_rng(1)
  c, r, rc, rr = (jnp.asarray(rng.normal(-10, 2, 8), jnp.float32) for _ in range(4))
  for loss_type in ("sigmoid", "ipo"):
    loss = lambda *a: rl.dpo_loss(*a, beta=0.1, loss_type=loss_type)[0]  # noqa: E731
    gc, gr, grc, grr = jax.grad(loss, argnums=(0, 1, 2, 3))(c, r, c, r)  # policy == reference
    assert np.all(gc < 0) and np.all(gr > 0), loss_type  # descent: chosen log-prob up, rejected down
    np.testing.assert_array_equal(grc, 0.0)  # the reference is not trained
    np.testing.assert_array_equal(grr, 0.0)
  # sigmoid DPO at h = 0: dL/dlogπ(y_w) = −β·σ(0)/B exactly
  gc = jax.grad(lambda x: rl.dpo_loss(x, r, c, r, beta=0.1)[0])(c)
  np.testing.assert_allclose(gc, -0.1 * 0.5 / 8, rtol=1e-6)
  assert float(rl.dpo_loss(c, r, rc, rr, beta=0.1)[0]) != pytest.approx(math.log(2))
  assert float(rl.dpo_loss(c, r, c, r, beta=0.1)[0]) == pytest.approx(math.log(2))


def test_record_pairs_weights_each_record_once():
  from rlhfjax.train.dpo_stage import record_pairs
  x = jnp.asarray([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]])
  valid = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # a ranking of 3, a padded pair
  better, worse, w = record_pairs(x, valid)
  np.testing.assert_array_equal(better, [3, 3, 2, 5, 5, 4])
  np.testing.assert_array_equal(worse, [2, 1, 1, 4, 0, 0])
  np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1, 0, 0])


def _batches(cfg, n, b=8, k=2, p=6, t=14, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    pad = rng.integers(0, 3, (b, 1, 1))
    lens = rng.integers(2, t - p, (b, k, 1))
    col = np.arange(t)[None, None]
    mask = ((col >= pad) & ((col < p) | (col < p + lens))).astype(np.int32)
    out.append(dict(tokens=rng.integers(4, cfg.vocab_size, (b, k, t)).astype(np.int32) * mask, mask=mask,
                    valid=np.ones((b, k), np.float32)))
  return out


def test_sequence_logps_sum_the_response_tokens(tiny_cfg):
  from rlhfjax.models import PolicyModel, init_params
  from rlhfjax.train.dpo_stage import sequence_logps
  model = PolicyModel(tiny_cfg)
  params = init_params(model, jax.random.key(0))
  batch = _batches(tiny_cfg, 1)[0]
  tokens, mask = batch["tokens"][:, 0], batch["mask"][:, 0]
  logps, n = jax.jit(functools.partial(sequence_logps, model=model, prompt_len=6))(params, tokens, mask)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, pos, mask)[0], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = [sum(logp[i, t - 1, tokens[i, t]] for t in range(6, 14) if mask[i, t]) for i in range(8)]
  np.testing.assert_allclose(logps, want, rtol=1e-5)
  np.testing.assert_array_equal(n, mask[:, 6:].sum(1))


def _run_steps(mesh, cfg, batches, params):
  from rlhfjax.models import PolicyModel
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.train.dpo_stage import DPOConfig, make_dpo_step
  from rlhfjax.train.state import OptimConfig, create_train_state, make_optimizer
  dpo = DPOConfig(beta=0.5)
  # Adam's eps well above float noise: a gradient that is 0 up to rounding must not step by ±lr
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, eps=1e-4), len(batches))
  model = PolicyModel(cfg)
  state, shardings = create_train_state(model, tx, jax.random.key(1), mesh, axes.DEFAULT_RULES,
                                        params=params)
  ref = jax.device_put(params, shardings.params)
  step = make_dpo_step(model, tx, dpo, 6, shardings, mesh, axes.DEFAULT_RULES)
  metrics = []
  for b in batches:
    state, m = step(state, ref, shard_batch(b, mesh))
    metrics.append(m)
  return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_and_learns(tiny_cfg):
  from rlhfjax.models import PolicyModel, init_params
  from rlhfjax.parallel import create_mesh
  params = jax.device_get(init_params(PolicyModel(tiny_cfg), jax.random.key(0)))
  batches = _batches(tiny_cfg, 1) * 4  # the same pairs four times: the loss must fall
  single, m1 = _run_steps(create_mesh((1, 1, 1), jax.devices()[:1]), tiny_cfg, batches, params)
  sharded, m8 = _run_steps(create_mesh((2, 2, 2)), tiny_cfg, batches, params)
  assert m1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
  assert m1[-1]["loss"] < m1[0]["loss"] and m1[-1]["reward_accuracy"] > 0.5
  for a, b in zip(m1, m8):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(single.params, sharded.params, rtol=1e-5, atol=1e-5)


def _config(workdir, stages="sft,dpo"):
  """test_reward_pipeline's tiny sft config (its compiled programs are shared), the `dpo` stage on
  user preference files: the chosen answer said once, the rejected says it twice."""
  from experiments import dpo_preference, preference
  from tests import tiny
  rng = np.random.default_rng(0)
  for split, n in (("train", 48), ("test", 16)):
    with open(workdir / f"{split}.jsonl", "w") as f:
      for a, b in rng.integers(10, 99, (n, 2)):
        ans = f"The answer is {a + b}."
        f.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": ans,
                            "rejected": f"{ans} {ans}", "answer": str(a + b)}) + "\n")
  c = tiny.get_config()
  c.unlock()
  c.rm, c.labeler, c.dpo = preference.rm_config(), preference.labeler_config(), dpo_preference.dpo_config()
  c.stages = stages
  c.sft.eval_examples = 0
  c.rm.update(train_file=str(workdir / "train.jsonl"), test_file=str(workdir / "test.jsonl"))
  c.dpo.update(batch_size=8, epochs=1.0, learning_rate=3e-3, warmup_steps=1, log_every=3,
               checkpoint_every=100, eval_batch_size=32, gold_eval_prompts=8, samples_table=4)
  c.lock()
  return c


def test_dpo_stage_end_to_end_and_alone(tmp_path):
  from rlhfjax.train.pipeline import train_and_evaluate
  first = tmp_path / "first"
  first.mkdir()
  res = train_and_evaluate(_config(first), str(first))["dpo"]
  assert res["steps"] == 6 and res["train_records"] == 48 and res["test_records"] == 16
  assert res["before_loss"] == pytest.approx(math.log(2), abs=1e-5) and res["before_kl_seq_mean"] == 0
  # held-out pairs: the implicit reward learned to prefer the answer said once
  assert res["after_loss"] < math.log(2) and res["after_reward_accuracy"] > 0.5
  assert res["after_reward_margin"] > 0 and res["after_logps_rejected"] < res["before_logps_rejected"]
  for k in ("before_gold_mean", "after_gold_mean", "after_kl_seq_mean", "gold_gain_in_sft_std"):
    assert np.isfinite(res[k]), k
  rows = [json.loads(l) for l in open(first / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["stage"] == "dpo"] == [3, 6]
  assert any(json.loads(l)["stage"] == "dpo_gold_eval" for l in open(first / "samples.jsonl"))

  # `dpo` alone on a workdir whose sft finished: the policy and reference from checkpoints/sft
  alone = tmp_path / "alone"
  shutil.copytree(first, alone, ignore=shutil.ignore_patterns("dpo", "*.jsonl", "results.json"))
  again = train_and_evaluate(_config(alone, "dpo"), str(alone))["dpo"]
  assert not any(json.loads(l)["stage"] == "sft" for l in open(alone / "metrics.jsonl"))
  for k in ("after_loss", "after_reward_accuracy", "after_gold_mean", "after_kl_seq_mean"):
    assert again[k] == pytest.approx(res[k], abs=1e-5), k
