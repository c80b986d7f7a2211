"""Supervised fine-tuning: next-token loss on response tokens only, one jitted sharded step, and the
`sft` stage (the driver in `rlhfjax.train.stage` runs it)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfjax.config import to_dataclass
from rlhfjax.models.heads import PolicyModel
from rlhfjax.models.sequence import token_logprobs
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import batch_sharding, replicated, shard_batch
from rlhfjax.train.stage import Stage, register_stage
from rlhfjax.train.state import (OptimConfig, TrainState, create_train_state, make_optimizer,
                                 state_shardings)

SFT_BATCH_KEYS = ("tokens", "mask", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 300  # optimizer updates
  batch_size: int = 32  # global batch (sequences per update)
  learning_rate: float = 3e-3  # peak AdamW learning rate
  warmup_steps: int = 30  # linear warmup
  min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
  weight_decay: float = 0.01  # decoupled weight decay on matrices
  grad_clip: float = 1.0  # global-norm gradient clipping (0 = off)
  log_every: int = 20  # metrics to metrics.jsonl / TensorBoard every N steps
  eval_every: int = 0  # held-out loss + accuracy every N steps (0 = only before and after)
  eval_examples: int = 128  # held-out problems used for accuracy (0 = skip sampling-based eval)
  checkpoint_every: int = 100  # Orbax save every N steps (and at the end)
  keep_checkpoints: int = 2  # checkpoints kept on disk

  def optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                       min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                       grad_clip=self.grad_clip)


def sft_loss(params, batch, model_cfg: TransformerConfig):
  """Mean next-token NLL over the targets `loss_mask` [B, T] marks (logits at t-1 predict token t)
  of a batch of `tokens, mask, positions` [B, T]; (loss, {loss, token_accuracy, target_tokens})."""
  logits, _ = PolicyModel(model_cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                           batch["mask"])
  targets = batch["tokens"][:, 1:]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  logp = token_logprobs(logits[:, :-1], targets)
  n = jnp.maximum(weights.sum(), 1.0)
  loss = -(logp * weights).sum() / n
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == targets).astype(jnp.float32)
  return loss, {"loss": loss, "token_accuracy": (correct * weights).sum() / n, "target_tokens": weights.sum()}


def sft_train_step(state: TrainState, batch, *, model_cfg: TransformerConfig,
                   tx: optax.GradientTransformation):
  """One AdamW update on a batch. Pure; jit it with `make_sft_step`."""
  (_, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(state.params, batch, model_cfg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)  # checked on the host before any save
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_sft_step(model_cfg: TransformerConfig, tx, shardings, mesh, rules):
  """`jax.jit` of the SFT step with explicit in/out shardings; the state is donated."""
  batch_shardings = {k: batch_sharding(mesh, 2, rules) for k in SFT_BATCH_KEYS}
  step = lambda state, batch: sft_train_step(state, batch, model_cfg=model_cfg, tx=tx)
  return jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_loss(model_cfg: TransformerConfig):
  return jax.jit(lambda params, batch: sft_loss(params, batch, model_cfg)[1])


def select(batch: dict, keys=SFT_BATCH_KEYS) -> dict:
  return {k: batch[k] for k in keys}


def heldout_loss(run, params, eval_loss, batch_size: int, n_examples: int) -> float:
  """Mean SFT loss per target token over the first `n_examples` held-out examples, in fixed-shape
  batches (the last one padded with repeats that carry no loss)."""
  from rlhfjax.data import collate_sft
  d = run.config.data
  exs = [run.test_examples[i] for i in range(min(n_examples, len(run.test_examples)))]
  total, tokens = 0.0, 0.0
  for i in range(0, len(exs), batch_size):
    chunk = exs[i:i + batch_size]
    batch = select(collate_sft(chunk + chunk[-1:] * (batch_size - len(chunk)), run.tokenizer,
                               d.max_prompt_len, d.max_response_len))
    batch["loss_mask"] = np.where(np.arange(batch_size)[:, None] < len(chunk), batch["loss_mask"], 0)
    m = eval_loss(params, batch)
    total += float(m["loss"]) * float(m["target_tokens"])
    tokens += float(m["target_tokens"])
  return total / tokens if tokens else float("nan")


@register_stage("sft")
class SFTStage(Stage):
  """Imitate the data's demonstrations (`config.sft`); eval: held-out accuracy and loss."""

  finite_keys = ("loss", "grad_norm", "param_norm")
  rate_name = "tokens_per_s"
  progress_keys = ("loss", "tokens_per_s")

  @classmethod
  def check_config(cls, config):
    to_dataclass(SFTConfig, config.sft)

  def __init__(self, run):
    super().__init__(run)
    self.cfg = cfg = to_dataclass(SFTConfig, run.config.sft)
    self.total_steps, self.log_every, self.eval_every = cfg.steps, cfg.log_every, cfg.eval_every
    self.checkpoint_every, self.keep_checkpoints = cfg.checkpoint_every, cfg.keep_checkpoints
    self.tx = make_optimizer(cfg.optim(), cfg.steps)
    self.module = PolicyModel(run.model_cfg)
    self.eval_rng = jax.random.key(run.seed + 1)
    self.eval_loss = make_eval_loss(run.model_cfg)
    from rlhfjax.data import DataIterator, collate_sft
    d = run.config.data
    collate = functools.partial(collate_sft, tokenizer=run.tokenizer, max_prompt_len=d.max_prompt_len,
                                max_response_len=d.max_response_len)
    self.data = DataIterator(run.train_examples, cfg.batch_size // jax.process_count(), seed=run.seed,
                             collate=collate)

  def state_spec(self):
    return state_shardings(self.module, self.tx, self.run.mesh, self.run.rules)

  def init_state(self):
    return create_train_state(self.module, self.tx, jax.random.key(self.run.seed), self.run.mesh,
                              self.run.rules, params=self.run.base_params())[0]

  def start(self, state):
    _, shardings = self.state_spec()
    self.step_fn = make_sft_step(self.run.model_cfg, self.tx, shardings, self.run.mesh, self.run.rules)

  def step(self, state, step):
    batch = select(next(self.data))
    state, metrics = self.step_fn(state, shard_batch(batch, self.run.mesh, self.run.rules))
    return state, metrics, float(np.sum(batch["mask"]))

  def evaluate(self, state):
    """Greedy and sampled accuracy on the first `eval_examples` held-out problems, held-out loss."""
    from rlhfjax.rewards.verify import verify
    from rlhfjax.sampling.completions import generate_completions
    run, n, d = self.run, self.cfg.eval_examples, self.run.config.data
    examples = [run.test_examples[i] for i in range(min(n, len(run.test_examples)))]
    questions, answers = [e["prompt"] for e in examples], [e.get("answer") for e in examples]
    out, samples = {}, []
    for name, greedy in (("greedy", True), ("sampled", False)) if examples else ():
      texts = generate_completions(state.params, run.model_cfg, run.tokenizer, questions,
                                   max_prompt_len=d.max_prompt_len, max_new_tokens=d.max_response_len,
                                   batch_size=run.config.eval.batch_size, rng=self.eval_rng,
                                   greedy=greedy, temperature=run.config.eval.temperature)
      correct = verify(texts, examples)
      out[f"accuracy_{name}"] = float(np.mean(correct))
      if greedy:
        samples = [dict(prompt=q, completion=t, answer=a, correct=bool(c))
                   for q, t, a, c in zip(questions, texts, answers, correct)][:32]
    out["heldout_loss"] = heldout_loss(run, state.params, self.eval_loss, run.config.eval.batch_size, n)
    return out, samples

  def result(self, state, result):
    result["steps"] = self.cfg.steps
    return result

