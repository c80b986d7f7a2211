"""The `sft` stage: host loop around the jitted SFT step (data, eval, metrics, checkpoints, resume)."""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from rlhfjax.checkpoint import Checkpointer, abstract_like
from rlhfjax.config import to_dataclass
from rlhfjax.data import DataIterator, collate_sft
from rlhfjax.models.heads import PolicyModel
from rlhfjax.parallel import shard_batch
from rlhfjax.train.evaluate import task_accuracy
from rlhfjax.train.pipeline import Run, register_stage
from rlhfjax.train.sft import SFTConfig, Throughput, check_finite, make_eval_loss, make_sft_step, select
from rlhfjax.train.state import create_train_state, make_optimizer, state_shardings

log = logging.getLogger("rlhfjax")


def evaluate_policy(run: Run, params, n_examples: int, rng) -> tuple[dict, list]:
  """Greedy and sampled accuracy on the first `n_examples` held-out problems (0 = skip)."""
  if n_examples <= 0:
    return {}, []
  d = run.config.data
  examples = [run.test_examples[i] for i in range(min(n_examples, len(run.test_examples)))]
  return task_accuracy(params, run.model_cfg, run.tokenizer, examples,
                       max_prompt_len=d.max_prompt_len, max_new_tokens=d.max_response_len,
                       batch_size=run.config.eval.batch_size, rng=rng,
                       temperature=run.config.eval.temperature)


def heldout_loss(run: Run, params, eval_loss, batch_size: int, n_examples: int) -> float:
  d = run.config.data
  exs = [run.test_examples[i] for i in range(min(n_examples, len(run.test_examples)))]
  exs = exs[: max(batch_size, len(exs) // batch_size * batch_size)]
  losses = []
  for i in range(0, len(exs) - batch_size + 1, batch_size):
    batch = collate_sft(exs[i:i + batch_size], run.tokenizer, d.max_prompt_len, d.max_response_len)
    losses.append(float(eval_loss(params, select(batch))["loss"]))
  return float(np.mean(losses))


def sft_data_iterator(run: Run, batch_size: int) -> DataIterator:
  d = run.config.data
  collate = functools.partial(collate_sft, tokenizer=run.tokenizer, max_prompt_len=d.max_prompt_len,
                              max_response_len=d.max_response_len)
  return DataIterator(run.train_examples, batch_size // jax.process_count(), seed=run.seed,
                      collate=collate)


@register_stage("sft")
def run_sft(run: Run) -> dict:
  cfg = to_dataclass(SFTConfig, run.config.sft)
  tx = make_optimizer(cfg.optim(), cfg.steps)
  module = PolicyModel(run.model_cfg)
  abstract, shardings = state_shardings(module, tx, run.mesh, run.rules)
  ckpt_dir = run.ckpt_dir("sft")
  # closing waits for in-flight async saves, also when training stops on an error (NaN)
  with Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints) as ckpt:
    return _train_sft(run, cfg, tx, module, abstract, shardings, ckpt, ckpt_dir)


def _train_sft(run: Run, cfg: SFTConfig, tx, module, abstract, shardings, ckpt, ckpt_dir) -> dict:
  data = sft_data_iterator(run, cfg.batch_size)
  eval_rng = jax.random.key(run.seed + 1)
  eval_loss = make_eval_loss(run.model_cfg)

  meta: dict = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(abstract, shardings))
    data.set_state(meta["data"])
    log.info("sft: resumed from step %d in %s", int(state.step), ckpt_dir)
  else:
    state, _ = create_train_state(module, tx, jax.random.key(run.seed), run.mesh, run.rules)
    before, _ = evaluate_policy(run, state.params, cfg.eval_examples, eval_rng)
    before["heldout_loss"] = heldout_loss(run, state.params, eval_loss, run.config.eval.batch_size,
                                          cfg.eval_examples)
    meta = {"before": before}
    run.writer.write("sft_eval", 0, before)
  start = int(state.step)

  if start < cfg.steps:
    from rlhfjax.metrics import ProgressBar
    step_fn = make_sft_step(run.model_cfg, tx, shardings, run.mesh, run.rules)
    bar = ProgressBar(cfg.steps, "sft", initial=start)
    speed = Throughput()
    pending: list = []
    last_good = ckpt.latest_step()
    for step in range(start + 1, cfg.steps + 1):
      batch = select(next(data))
      state, metrics = step_fn(state, shard_batch(batch, run.mesh, run.rules))
      pending.append(metrics)
      speed.add(float(np.sum(batch["mask"])))
      boundary = step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps
      if boundary:  # one device->host transfer per interval; NaN is caught before any save
        host = jax.device_get(pending)
        pending = []
        for i, m in enumerate(host):
          check_finite({k: m[k] for k in ("loss", "grad_norm", "param_norm")}, "sft",
                       step - len(host) + 1 + i, last_good, ckpt_dir)
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        avg["tokens_per_s"] = speed.rate()
        run.writer.write("sft", step, avg)
        bar.update(step, loss=avg["loss"], tokens_per_s=avg["tokens_per_s"])
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        acc, _ = evaluate_policy(run, state.params, cfg.eval_examples, eval_rng)
        run.writer.write("sft_eval", step, acc)
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        ckpt.save(step, state, {**meta, "data": data.get_state(), "stage": "sft"}, force=True)
        last_good = step
    bar.close()

  after, samples = evaluate_policy(run, state.params, cfg.eval_examples, eval_rng)
  after["heldout_loss"] = heldout_loss(run, state.params, eval_loss, run.config.eval.batch_size,
                                       cfg.eval_examples)
  run.writer.write("sft_eval", cfg.steps, after)
  run.writer.write_samples("sft", cfg.steps, samples[:32])
  run.params["sft"] = state.params
  before = meta.get("before", {})
  result = {f"before_{k}": v for k, v in before.items()}
  result.update({f"after_{k}": v for k, v in after.items()})
  result["steps"] = cfg.steps
  return result
