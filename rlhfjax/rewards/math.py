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
  leading number ("the answer is 7 apples" -> ``7``; not in a list, "12 or 13", "12, 13", "12; 13",
  "12 and 13", and not the start of an expression, "1e6", "2^{10}", "3\\sqrt{2}", "5 - 2 = 3"), else
  its clause up to the end of the sentence (``B``, ``x = 5``, ``2^{10}``); a phrase's text ends where
  the next statement starts.
- **The last statement counts, and all must agree.** A statement is *definite* when it is boxed,
  after ``####``, a number, or one short token such as a choice letter (not a word of three or
  more letters: "the answer is correct" is commentary, not an answer). The final answer is the
  last definite statement, and every definite statement must equal it under ``answers_match``
  (``3,151`` restates ``3151``); if two differ the completion hedged and has no final answer
  (None): "The answer is 12 ... no wait, 13. The answer is 13" scores 0 for 12 and for 13. With no
  definite statement the last statement counts.
- **Fallback.** With no statement at all, the last number in the text.

Comparison (``answers_match``) normalizes thousands separators (``1{,}000`` too), whitespace, ``$``,
``\\(...\\)``, a leading ``+``, the unicode minus, trailing periods, ``\\frac{a}{b}`` / ``\\frac12`` (signed:
``-\\frac{1}{2}``), ``\\text{...}`` (dropped when it is a unit ending the answer after a number:
``12\\text{ cm}``, but not ``5\\text{ or more}``), degree signs, a trailing ``%``, ``(B)`` -> ``B``, and
an ``x = `` prefix (only a name or expression: ``x != 5``, ``x <= 5``, ``3 = 5``, ``x = 3 or x = 5``,
``x = 3, y = 5`` keep theirs and match no number), then compares numbers exactly as rationals
(``fractions.Fraction``: ``12 == 12.0``, ``1/2 == 0.5``; ``a/b/c`` and exponents beyond 1000, e.g. the
``1e999999999`` that would take Fraction forever, are no numbers). A relative tolerance of 1e-6 is used
only where exact comparison is impossible: a non-terminating rational (``1/3``) against a rounded
decimal (``0.3333333``, never an integer: ``333333`` is not ``1000000/3``), or a number too large/odd
for ``Fraction``. Two non-numeric answers match when their normalized strings are identical
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
# A phrase's leading number, not the first of a list ("12 or 13", "12, 13", "12; 13", "12 and 13", a dangling
# "12 or" before a line break) and not the start of an expression ("1e6", "2^{10}", "3\\sqrt{2}", "5 - 2 = 3").
_LIST_AFTER = (r"\s*(?:(?:[,;&]|\(\s*(?:or|and)\b|\b(?:or|and|to|nor)\b|\\text\s*\{\s*(?:or|and)\s*\})\s*)+"
               r"(?:(?:maybe|perhaps|possibly|probably|even|also)\s+)?[-+\u2212]?\\?\$?\s*\d|\s*\bor\s*$")
_EXPR_AFTER = (r"[eE][-+\u2212]?\d|\s*(?:[=<>\u00d7\u00b7\u00f7\u221a\u03c0\u2264\u2265\u2260]|[xX]\s*\d"
               r"|\*(?!\*)|\*\*\s*[\d(]|\^(?!\s*\{?\s*\\circ)"
               r"|[-+\u2212]\s*[\d(\\]|\\(?:times|cdot|div|sqrt|pi|frac|dfrac|tfrac|pm|mp|le|ge|leq|geq|ne|neq"
               r"|approx)(?![A-Za-z]))")
_LEADING_NUM_RE = re.compile(r"^\s*(?:\$|\\\(|\\\[)?\s*(" + _NUM + r")(?![\d/]|\.\d)(?!" + _LIST_AFTER + r")(?!"
                             + _EXPR_AFTER + r")")
_FINAL_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|####|\b(?:final\s+)?answer"
                       r"(?:\s+is\s*:?|\s*(?:\*\*)?\s*:\s*(?:\*\*)?)", re.IGNORECASE)
_THINK_OPEN, _THINK_CLOSE = "<thinking>", "</thinking>"


def _closing_braces(text: str) -> dict[int, int]:
  """Maps the position of each balanced ``{`` to that of its ``}``, in one pass (a box per brace would
  rescan the rest of the text: quadratic time on many unbalanced ``\\boxed{``)."""
  pairs, stack = {}, []
  for i, ch in enumerate(text):
    if ch == "{":
      stack.append(i)
    elif ch == "}" and stack:
      pairs[stack.pop()] = i
  return pairs


def _boxed_at(text: str, start: int, pairs: dict[int, int] | None = None) -> str | None:
  """Content of the ``\\boxed{`` whose brace ends at ``start`` (balanced), or None if unbalanced."""
  end = (_closing_braces(text) if pairs is None else pairs).get(start - 1)
  return None if end is None else text[start:end]


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
  pairs = _closing_braces(text) if any(m.group().startswith("\\") for m in found) else {}
  for m, end in zip(found, [n.start() for n in found[1:]] + [len(text)]):
    if m.group().startswith("\\"):
      answer = (_boxed_at(text, m.end(), pairs) or "").strip()
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


_FRAC_RE = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")  # \frac{1}{2}, \frac12
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|boldsymbol|mbox)\s*\{([^{}]*)\}")
# A unit after a number, at the end ("12\text{ cm}", "5\text{ m}^2"), unless its words hedge or negate
# ("5\text{ or more}", "3\text{ or }4", "5\text{ is wrong}"); degree signs anywhere.
_UNIT_RE = re.compile(r"(?<=\d)\s*\\(?:text|mbox|mathrm)\s*\{(\s*[A-Za-z ]+)\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
                      r"(?=\s*\.?\s*$)")
_NOT_UNIT_RE = re.compile(r"\b(?:or|and|not|no|nor|never|is|are|to|more|less|fewer|than|plus|minus|times|except|but"
                          r"|maybe|perhaps|possibly|either|neither|wrong|incorrect)\b", re.IGNORECASE)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# What "x = 5" may hold left of the answer: a name or expression ("x", "f(3)", "a+b", "\theta_1", "2^{10}", "5-2")
# -- no comparison ("x != 5", "x <= 5") and no list or alternative ("x = 3, y = 4", "x = 3 or x = 4").
_LHS_RE = re.compile(r"(?:[A-Za-z0-9_{}()'^.+\-*/]|\\[A-Za-z]+)+")
_HEDGE_RE = re.compile(r"[,;&<>!|:]|\b(?:or|and)\b|\\(?:quad|qquad|vee|lor|land|wedge|cup|text|mbox|neq?|[lg]eq?)\b"
                       r"|\\\\")
_MAX_EXPONENT = 1000  # |e| in "1e<e>": Fraction("1e999999999") would build a 10^999999999 integer (hangs)
_EXPONENT_RE = re.compile(r"[eE]\s*[-+]?(\d+)")


def _frac(m: re.Match) -> str:
  num = m.group(1) if m.group(1) is not None else m.group(2)
  den = m.group(3) if m.group(3) is not None else m.group(4)
  return f"({num})/({den})"


def _unit(m: re.Match) -> str:
  return m.group() if _NOT_UNIT_RE.search(m.group(1)) else ""


def _strip_lhs(s: str, spaced: str) -> str:
  """``x=5`` -> ``5``; ``x=10/2=5`` -> ``5``. Left as it is (so it matches no number) when the left side is no
  plain name or expression, a number left of the last ``=`` differs from the answer (``3=4``), or the text
  (``spaced``: before whitespace removal) lists alternatives or compares."""
  parts = s.split("=")
  last = parts[-1]
  if _HEDGE_RE.search(spaced) or not last:
    return s
  for i, part in enumerate(parts[:-1]):
    if not part and i == 0:
      continue  # "=5"
    if not _LHS_RE.fullmatch(part) or (i > 0 and re.search(r"[A-Za-z]", part)):
      return s  # middle parts of a chain are numbers or arithmetic: "x = 3 or x = 4" has "3orx"
    value = _to_fraction(part)
    if value is not None and not _values_match(value, _to_fraction(last)):
      return s
  return last


def _normalize(ans: str) -> str:
  s = ans.strip()
  s = s.replace("{,}", ",").replace("\\displaystyle", "")  # "1{,}000"
  s = _FRAC_RE.sub(_frac, s)
  s = _UNIT_RE.sub(_unit, s)  # "12\text{ cm}"
  s = _DEGREE_RE.sub("", s)  # "90^\circ"
  s = _TEXT_RE.sub(r"\1", s)
  for old, new in (("\u2212", "-"), ("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ""), ("**", ""),
                   ("\\left", ""), ("\\right", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
                   ("\u00a0", " ")):
    s = s.replace(old, new)
  spaced = s
  s = "".join(s.split())  # all whitespace
  if "=" in s:  # "x=5" -> "5"
    s = _strip_lhs(s, spaced)
  s = s.rstrip(".").removesuffix("\\%").rstrip("%").removeprefix("+")
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  # "(1)/(2)" from \frac -> "1/2" when both parts are plain; "-(1)/(2)" -> "-1/2".
  m = re.fullmatch(r"([-+]?)\((-?[\d.]+)\)/\((-?[\d.]+)\)", s)
  if m and not (m.group(1) == "-" and m.group(2).startswith("-")):
    s = f"{m.group(1).replace('+', '')}{m.group(2)}/{m.group(3)}"
  m = re.fullmatch(r"\(([A-Za-z])\)", s)  # "(B)" -> "B"
  if m:
    s = m.group(1)
  return s


def _to_fraction(s: str) -> Fraction | float | None:
  """Exact rational when possible, a float for finite non-rational spellings, else None (also for a
  decimal exponent beyond ``_MAX_EXPONENT``, and for ``a/b/c``)."""
  if not s or s.count("/") > 1:
    return None
  if any(len(e) > 4 or int(e) > _MAX_EXPONENT for e in _EXPONENT_RE.findall(s)):
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


def _values_match(p: Fraction | float | None, g: Fraction | float | None, rel_tol: float = 1e-6) -> bool:
  """Two parsed numbers: exactly equal, or (module docstring) within ``rel_tol`` where exactness is impossible --
  but an integer never stands for a non-integer rational (``333333`` is not ``1000000/3``)."""
  if p is None or g is None:
    return False
  if isinstance(p, Fraction) and isinstance(g, Fraction):
    if p == g:
      return True
    if _terminates(p) and _terminates(g):
      return False  # both exactly representable: exact comparison decided it
    if p.denominator == 1 or g.denominator == 1:
      return False  # an integer is no rounded decimal of a fraction
  return math.isclose(float(p), float(g), rel_tol=rel_tol, abs_tol=0.0)


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
    return _values_match(p, g, rel_tol)
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
