"""Math answer verifier: find the final answer in a completion and compare it with the gold one.

Extraction (``extract_answer``) reads the text after the last ``</thinking>`` when that is
non-blank (numbers inside the thinking block are then ignored), else the whole text, and takes the
first found of: the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled); the last "The
(final) answer is ..."; the last "Answer: ..." (also "Final answer: ...", "**Answer:** ..."); the
last GSM8K-style "#### ..."; the last number in the text.

Comparison (``answers_match``) normalizes thousands separators, whitespace, ``$``, a leading
``+``, the unicode minus, trailing periods, ``\\frac{a}{b}``, ``\\text{...}``, a trailing ``%``,
and an ``x = `` prefix, then compares numbers exactly as rationals (``fractions.Fraction``:
``12 == 12.0``, ``1/2 == 0.5``). A relative tolerance of 1e-6 is used only where exact
comparison is impossible: a non-terminating rational (``1/3``) against a rounded decimal
(``0.3333333``), or a number too large/odd for ``Fraction``. Two non-numeric answers match when
their normalized strings are identical (case-insensitive), e.g. multiple-choice letters. Anything
else -- ``None``, empty, one side unparseable -- is ``False``; it never raises.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Sequence

import numpy as np


# A number as people write it: optional sign (incl. unicode minus), thousands groups or plain
# digits, optional decimals, optional "/denominator".
_NUM = r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"
_NUM_RE = re.compile(_NUM)
_LEADING_NUM_RE = re.compile(r"^\s*\$?\s*(" + _NUM + r")(?![\d/])")
_ANSWER_IS_RE = re.compile(r"(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"(?:final\s+)?answer\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*([^\n]*)", re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_CLOSE = "</thinking>"


def _last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
  result = None
  for m in _BOXED_RE.finditer(text):
    depth, i = 1, m.end()
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      result = text[m.end():i - 1]
  return result


def _clean_phrase(span: str) -> str | None:
  """Turns the text after "The answer is" into an answer: its leading number, or the clause."""
  span = span.strip().strip("*").strip()
  boxed = _last_boxed(span)
  if boxed is not None:
    return boxed.strip() or None
  m = _LEADING_NUM_RE.match(span)
  if m:
    return m.group(1).strip()
  # Non-numeric answer ("B", "x = 5"): up to the end of the sentence.
  span = re.split(r"\.(?:\s|$)", span, maxsplit=1)[0]
  span = span.strip().strip("*$ ").strip()
  return span or None


def _extract_from(text: str) -> str | None:
  boxed = _last_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  for pattern in (_ANSWER_IS_RE, _ANSWER_COLON_RE, _HASHES_RE):
    for m in reversed(list(pattern.finditer(text))):
      answer = _clean_phrase(m.group(1))
      if answer is not None:
        return answer
  numbers = _NUM_RE.findall(text)
  return numbers[-1].strip() if numbers else None


def extract_answer(text: str | None) -> str | None:
  """Returns the final answer written in ``text`` (a string, un-normalized), or None."""
  if not isinstance(text, str) or not text.strip():
    return None
  if _THINK_CLOSE in text:
    tail = text.rsplit(_THINK_CLOSE, 1)[1]
    if tail.strip():
      return _extract_from(tail)
  return _extract_from(text)


_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _normalize(ans: str) -> str:
  s = ans.strip()
  s = _FRAC_RE.sub(r"(\1)/(\2)", s)
  s = _TEXT_RE.sub(r"\1", s)
  for old, new in (("\u2212", "-"), ("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ""), ("**", ""),
                   ("\\left", ""), ("\\right", ""), ("\u00a0", " ")):
    s = s.replace(old, new)
  s = "".join(s.split())  # all whitespace
  if "=" in s:  # "x=5" -> "5"
    s = s.rsplit("=", 1)[1]
  s = s.rstrip(".").removesuffix("\\%").rstrip("%").removeprefix("+")
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  # "(1)/(2)" from \frac -> "1/2" when both parts are plain.
  m = re.fullmatch(r"\((-?[\d.]+)\)/\((-?[\d.]+)\)", s)
  if m:
    s = f"{m.group(1)}/{m.group(2)}"
  return s


def _to_fraction(s: str) -> Fraction | float | None:
  """Exact rational when possible, a float for finite non-rational spellings, else None."""
  if not s:
    return None
  try:
    if "/" in s:
      num, den = s.split("/", 1)
      return Fraction(num) / Fraction(den)
    return Fraction(s)
  except (ValueError, ZeroDivisionError, OverflowError, TypeError):
    pass
  try:
    x = float(s)
  except (ValueError, OverflowError):
    return None
  return x if math.isfinite(x) else None


def _is_float(s: str) -> bool:
  try:
    float(s)
    return True
  except (ValueError, OverflowError):
    return False


def _terminates(q: Fraction) -> bool:
  """Whether ``q`` has a finite decimal expansion (denominator 2^a 5^b)."""
  d = q.denominator
  for p in (2, 5):
    while d % p == 0:
      d //= p
  return d == 1


def answers_match(pred: Any, gold: Any, *, rel_tol: float = 1e-6) -> bool:
  """Whether a predicted answer equals the gold answer (see module docstring). Never raises."""
  try:
    if pred is None or gold is None:
      return False
    p_str, g_str = _normalize(str(pred)), _normalize(str(gold))
    if not p_str or not g_str:
      return False
    p, g = _to_fraction(p_str), _to_fraction(g_str)
    if p is None and g is None:  # non-numeric answers, but never "nan"/"inf"
      return p_str.lower() == g_str.lower() and not (_is_float(p_str) or _is_float(g_str))
    if p is None or g is None:
      return False
    if isinstance(p, Fraction) and isinstance(g, Fraction):
      if p == g:
        return True
      if _terminates(p) and _terminates(g):
        return False  # both exactly representable: exact comparison decided it
    return math.isclose(float(p), float(g), rel_tol=rel_tol, abs_tol=0.0)
  except Exception:  # pylint: disable=broad-except
    return False


def math_reward(completions: Sequence[str], answers: Sequence[Any]) -> np.ndarray:
  """float32 ``[batch]``: 1.0 where the completion's extracted answer matches the gold answer
  (a string or number), else 0.0. Raises ValueError when the two lengths differ."""
  if len(completions) != len(answers):
    raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
  return np.array([float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers)],
                  dtype=np.float32)


def math_reward_fn(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None,
                   **unused_fields: Any) -> np.ndarray:
  """Contract-style math reward: 1/0 per completion, NaN where the gold ``answer`` is missing."""
  del prompts, unused_fields
  if answer is None:
    return np.full([len(completions)], np.nan, np.float32)
  scores = math_reward(completions, ["" if a is None else a for a in answer])
  missing = np.array([a is None or (isinstance(a, str) and not a.strip()) for a in answer], bool)
  scores[missing] = np.nan
  return scores
