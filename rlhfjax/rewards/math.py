"""Math answer verifier: find the final answer in a completion and compare it with the gold one.

Extraction (``extract_answer``):

- **Where.** A completion whose last ``<thinking>`` is not closed by a later ``</thinking>`` is
  still thinking and has no final answer (None). Otherwise the answer is read from the text after
  the last ``</thinking>`` when that is non-blank (statements inside or before the thinking are
  scratch work), else from the whole text. Only the completion is seen: when the prompt opens the
  block, a completion still thinking has no tag and is read as it is.
- **What counts as a stated final answer**, in order of position: ``\\boxed{...}`` /
  ``\\fbox{...}`` (nested braces handled; empty or unbalanced ones ignored); "The answer is ..."
  and "The final answer is ..." (optionally followed by a colon); "Answer: ...",
  "Final answer: ..." and "**Answer:** ..."; GSM8K's "#### ...". After a phrase the answer is its
  leading number ("the answer is 7 apples" -> ``7``; not in a list, "12 or 13", "12, 13"), else its
  clause up to the end of the sentence (``B``, ``x = 5``); a phrase's text ends where the next
  statement starts.
- **The last statement counts, and all must agree.** A statement is *definite* when it is boxed,
  after ``####``, a number, or one short token such as a choice letter (not a word of three or
  more letters: "the answer is correct" is commentary, not an answer). The final answer is the
  last definite statement, and every definite statement must equal it under ``answers_match``
  (``3,151`` restates ``3151``); if two differ the completion hedged and has no final answer
  (None): "The answer is 12 ... no wait, 13. The answer is 13" scores 0 for 12 and for 13. With no
  definite statement the last statement counts.
- **Fallback.** With no statement at all, the last number in the text.

Comparison (``answers_match``) normalizes thousands separators, whitespace, ``$``, a leading ``+``,
the unicode minus, trailing periods, ``\\frac{a}{b}``, ``\\text{...}`` (dropped when it is a unit
after a number: ``12\\text{ cm}``), degree signs, a trailing ``%``, and an ``x = `` prefix, then
compares numbers exactly as rationals (``fractions.Fraction``: ``12 == 12.0``, ``1/2 == 0.5``). A
relative tolerance of 1e-6 is used only where exact comparison is impossible: a non-terminating
rational (``1/3``) against a rounded decimal (``0.3333333``), or a number too large/odd for
``Fraction``. Two non-numeric answers match when their normalized strings are identical
(case-insensitive), e.g. multiple-choice letters. Anything else -- ``None``, empty, one side
unparseable -- is ``False``; it never raises.
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
# A phrase's leading number, not the first of a list ("12 or 13", "12, 13").
_LEADING_NUM_RE = re.compile(r"^\s*\$?\s*(" + _NUM + r")(?![\d/])(?!\s*(?:,|or)\s*[-+\u2212]?\d)")
_FINAL_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|####|\b(?:final\s+)?answer"
                       r"(?:\s+is\s*:?|\s*(?:\*\*)?\s*:\s*(?:\*\*)?)", re.IGNORECASE)
_THINK_OPEN, _THINK_CLOSE = "<thinking>", "</thinking>"


def _boxed_at(text: str, start: int) -> str | None:
  """Content of the ``\\boxed{`` whose brace ends at ``start`` (balanced), or None if unbalanced."""
  depth, i = 1, start
  while i < len(text) and depth:
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    i += 1
  return text[start:i - 1] if depth == 0 else None


def _clean_phrase(span: str) -> str | None:
  """Turns the text after "The answer is" into an answer: its leading number, or the clause."""
  span = span.strip().strip("*").strip()
  m = _LEADING_NUM_RE.match(span)
  if m:
    return m.group(1).strip()
  span = re.split(r"\.(?:\s|$)", span, maxsplit=1)[0]  # non-numeric ("B", "x = 5"): the sentence
  return span.strip().strip("*$ ").strip() or None


def _statements(text: str):
  """Yields ``(answer, definite)`` for each stated final answer, in order (module docstring)."""
  found = list(_FINAL_RE.finditer(text))
  for m, end in zip(found, [n.start() for n in found[1:]] + [len(text)]):
    if m.group().startswith("\\"):
      answer = (_boxed_at(text, m.end()) or "").strip()
      definite = True
    else:
      answer = _clean_phrase(text[m.end():end].split("\n", 1)[0]) or ""
      definite = m.group() == "####" or _to_fraction(_normalize(answer)) is not None or (
          len(answer.split()) == 1 and not re.fullmatch(r"[A-Za-z]{3,}", answer))
    if answer:
      yield answer, definite


def _extract_from(text: str) -> str | None:
  found = list(_statements(text))
  if not found:
    numbers = _NUM_RE.findall(text)
    return numbers[-1].strip() if numbers else None
  definite = [a for a, d in found if d] or [found[-1][0]]
  return definite[-1] if all(answers_match(a, definite[-1]) for a in definite) else None


def extract_answer(text: str | None) -> str | None:
  """Returns the final answer written in ``text`` (a string, un-normalized), or None."""
  if not isinstance(text, str) or not text.strip() or text.rfind(_THINK_OPEN) > text.rfind(_THINK_CLOSE):
    return None
  tail = text.rsplit(_THINK_CLOSE, 1)[-1]
  return _extract_from(tail if tail.strip() else text)


_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_UNIT_RE = re.compile(r"(?<=\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z ]+\}|\^\s*\{?\s*\\circ\s*\}?|\u00b0")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _normalize(ans: str) -> str:
  s = ans.strip()
  s = _FRAC_RE.sub(r"(\1)/(\2)", s)
  s = _UNIT_RE.sub("", s)  # "12\text{ cm}", "90^\circ"
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
