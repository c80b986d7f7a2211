"""Supervised fine-tuning: next-token loss on response tokens only, one jitted sharded step."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhfjax.models.heads import PolicyModel
from rlhfjax.models.sequence import token_logprobs
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import batch_sharding, replicated
from rlhfjax.train.state import OptimConfig, TrainState

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
  """Mean next-token NLL over response tokens.

  Args:
    params: policy parameters.
    batch: `tokens, mask, positions` [B, T] and `loss_mask` [B, T] (1 on response tokens, the
      targets); logits at column t-1 predict token t.
    model_cfg: static model config.

  Returns:
    (loss, metrics) with `loss`, `token_accuracy` and `target_tokens`.
  """
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


class Throughput:
  """Tokens/s between calls (host wall time)."""

  def __init__(self):
    self.t, self.tokens = time.perf_counter(), 0.0

  def add(self, tokens: float):
    self.tokens += tokens

  def rate(self) -> float:
    now = time.perf_counter()
    r = self.tokens / max(now - self.t, 1e-9)
    self.t, self.tokens = now, 0.0
    return float(r)


def check_finite(values: dict, stage: str, step: int, last_good: int | None, ckpt_dir: str):
  """Stop on a non-finite loss with one line naming the step and the last good checkpoint."""
  for k, v in values.items():
    if not np.all(np.isfinite(np.asarray(v))):
      where = f"step {last_good} in {ckpt_dir}" if last_good is not None else "none saved yet"
      raise FloatingPointError(f"{stage}: non-finite {k} at step {step}; stopped without saving; "
                               f"last good checkpoint: {where}")
