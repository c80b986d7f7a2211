"""Format reward for the thinking template, ``<thinking> ...reasoning... </thinking> final answer``,
and statistics about thinking.

``format_reward`` is 1.0 only for exactly one well-nested, non-empty thinking block at the start of
the completion (leading whitespace allowed) followed by a non-blank answer from which
``extract_answer`` can read something; mis-nested, unclosed or repeated tags, an empty block (only
whitespace or invisible characters such as a zero-width space), text before it, or nothing extractable
after it all score 0.0. If the prompt template already ends with the opening tag (the model starts
inside the block), pass ``open_tag_in_prompt=True``: the completion must then contain exactly one
closing tag and no opening tag.
"""
from __future__ import annotations

import unicodedata
from typing import Any, Sequence

import numpy as np

from rlhfjax.rewards.math import extract_answer

OPEN_TAG = "<thinking>"
CLOSE_TAG = "</thinking>"


def split_thinking(completion: str, *, open_tag_in_prompt: bool = False) -> tuple[str, str] | None:
  """Returns ``(thinking, answer)`` for a well-formed completion, else None (see module doc)."""
  text = completion if not open_tag_in_prompt else OPEN_TAG + completion
  if text.count(OPEN_TAG) != 1 or text.count(CLOSE_TAG) != 1:
    return None
  before, rest = text.split(OPEN_TAG, 1)
  if not _blank(before):
    return None
  thinking, answer = rest.split(CLOSE_TAG, 1)  # exactly one close tag, after the open one
  if _blank(thinking):
    return None
  return thinking, answer


def _blank(text: str) -> bool:
  """Nothing visible: whitespace and invisible format/control characters only (zero-width space, BOM, ...)."""
  return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp") for ch in text)


def is_well_formed(completion: str, *, open_tag_in_prompt: bool = False) -> bool:
  """Exactly one non-empty thinking block first, then an extractable answer."""
  parts = split_thinking(completion, open_tag_in_prompt=open_tag_in_prompt)
  return parts is not None and not _blank(parts[1]) and extract_answer(parts[1]) is not None


def format_reward(completions: Sequence[str], *, open_tag_in_prompt: bool = False) -> np.ndarray:
  """float32 ``[batch]``: 1.0 for well-formed completions, 0.0 otherwise."""
  return np.array([float(is_well_formed(c, open_tag_in_prompt=open_tag_in_prompt)) for c in completions],
                  dtype=np.float32)


def format_reward_fn(prompts: Sequence[str], completions: Sequence[str], **unused_fields: Any) -> np.ndarray:
  """Contract-style format reward (the opening tag is expected in the completion)."""
  del prompts, unused_fields
  return format_reward(completions)


def length_penalty_fn(prompts: Sequence[str], completions: Sequence[str], **unused_fields: Any) -> np.ndarray:
  """Minus the completion's length in whitespace-separated words: weighted, a per-token cost of
  thinking (`rl_reward = "math:1,length:0.02"`)."""
  del prompts, unused_fields
  return -np.array([len(c.split()) for c in completions], np.float32)


def thinking_stats(completions: Sequence[str], *, open_tag_in_prompt: bool = False,
                   answers: Sequence[Any] | None = None) -> dict[str, float]:
  """Host-side metrics about thinking, for logging: ``frac_thinking`` (fraction with a closed
  ``<thinking>...</thinking>`` block, any position), ``frac_well_formed`` (fraction scoring 1 under
  ``format_reward``), ``mean_thinking_chars`` / ``mean_thinking_words`` (length of the text between
  the first opening and the last closing tag, over the completions that think; 0.0 if none), and
  ``mean_completion_chars`` / ``mean_completion_words`` over all completions. With gold `answers`
  (None entries skipped), ``accuracy_thinking`` / ``accuracy_direct``: the math verifier's accuracy
  of the completions with / without a closed thinking block (NaN when there are none)."""
  n = len(completions)
  think_chars, think_words, well_formed = [], [], 0
  for c in completions:
    text = OPEN_TAG + c if open_tag_in_prompt else c
    start, end = text.find(OPEN_TAG), text.rfind(CLOSE_TAG)
    if start != -1 and end > start:
      body = text[start + len(OPEN_TAG):end]
      think_chars.append(len(body))
      think_words.append(len(body.split()))
    well_formed += is_well_formed(c, open_tag_in_prompt=open_tag_in_prompt)
  out = {}
  if answers is not None and any(a is not None for a in answers):
    from rlhfjax.rewards.math import math_reward
    keep = [i for i, a in enumerate(answers) if a is not None]
    correct = math_reward([completions[i] for i in keep], [answers[i] for i in keep])
    thinks = np.array([_thinks(OPEN_TAG + completions[i] if open_tag_in_prompt else completions[i])
                       for i in keep])
    for name, sel in (("accuracy_thinking", thinks), ("accuracy_direct", ~thinks)):
      out[name] = float(correct[sel].mean()) if sel.any() else float("nan")
  return out | {
      "frac_thinking": len(think_chars) / n if n else 0.0,
      "frac_well_formed": well_formed / n if n else 0.0,
      "mean_thinking_chars": float(np.mean(think_chars)) if think_chars else 0.0,
      "mean_thinking_words": float(np.mean(think_words)) if think_words else 0.0,
      "mean_completion_chars": float(np.mean([len(c) for c in completions])) if n else 0.0,
      "mean_completion_words": float(np.mean([len(c.split()) for c in completions])) if n else 0.0,
  }


def _thinks(text: str) -> bool:
  start, end = text.find(OPEN_TAG), text.rfind(CLOSE_TAG)
  return start != -1 and end > start
