"""JSONL: the one line-by-line object reader (`iter_objects`), and prompt/response files (`read_jsonl`)."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Iterator


_RAW_BAD = re.compile("[\udc80-\udcff]")  # undecodable bytes, as errors="surrogateescape" reads them
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a "\ud83d"-style escape: maybe a lone surrogate


def _has_lone_surrogate(v) -> bool:
  if isinstance(v, str):
    try:
      v.encode("utf-8")
      return False
    except UnicodeEncodeError:
      return True
  if isinstance(v, dict):
    return any(_has_lone_surrogate(k) or _has_lone_surrogate(x) for k, x in v.items())
  return isinstance(v, list) and any(_has_lone_surrogate(x) for x in v)


def iter_objects(path: str, on_bad: Callable[[int, str], None]) -> Iterator[tuple[int, dict]]:
  """Yields (line number, object) for each line of `path` that is a JSON object, in order.

  UTF-8 with or without a byte-order mark, LF or CRLF line ends. Blank lines are skipped; any other
  line calls `on_bad(line_number, reason)` ("invalid UTF-8", "invalid JSON", "lone surrogate" (a
  "\\ud800"-style escape no tokenizer can encode) or "not an object") when it is reached, so reports
  built from both see bad lines in file order.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is UTF-16 (e.g. written by Windows PowerShell), not UTF-8.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} not found")
  with open(path, "rb") as f:
    if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
      raise ValueError(f"{path}: the file is UTF-16 encoded (a UTF-16 byte-order mark); save it as UTF-8")
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for lineno, line in enumerate(f, 1):
      line = line.removeprefix("\ufeff")  # a byte-order mark (also where BOM'd files were concatenated)
      if not line.strip():
        continue
      if _RAW_BAD.search(line):
        on_bad(lineno, "invalid UTF-8")
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        on_bad(lineno, "invalid JSON")
        continue
      if not isinstance(obj, dict):
        on_bad(lineno, "not an object")
      elif _ESCAPED_SURROGATE.search(line) and _has_lone_surrogate(obj):
        on_bad(lineno, "lone surrogate")
      else:
        yield lineno, obj


def read_jsonl(
    path: str,
    *,
    prompt_key: str = "prompt",
    response_key: str | None = "response",
    answer_key: str | None = None,
    return_bad: bool = False,
) -> list[dict] | tuple[list[dict], list[tuple[int, str]]]:
  """Reads one JSON object per line into dicts {"prompt", ["response"], ["answer"]} of str.

  Blank lines are skipped. Lines that are not valid JSON objects, that lack a requested key, or whose
  prompt / response is not a string (or answer neither a string nor a number) are counted and reported
  in one warning (with the first few line numbers), not fatal; a file with no valid line is an error.

  Args:
    path: the .jsonl file.
    prompt_key: field holding the prompt (question) text.
    response_key: field holding the response text; None for prompt-only (RL) files.
    answer_key: optional field holding a gold answer for verifiers; stored as str.
    return_bad: also return the skipped lines as [(line_number, reason)].

  Returns:
    list of dicts with keys "prompt", plus "response" / "answer" when those keys are requested
    (and the bad lines when `return_bad`).
  """
  wanted = {"prompt": prompt_key, "response": response_key, "answer": answer_key}
  wanted = {k: v for k, v in wanted.items() if v is not None}
  out, bad = [], []
  for lineno, obj in iter_objects(path, lambda n, why: bad.append((n, why))):
    missing = [src for src in wanted.values() if src not in obj or obj[src] is None]
    # prompt and response must be text; an answer may be a number (stored as str), not a bool/list/dict
    wrong = [src for k, src in wanted.items() if src not in missing and (
        isinstance(obj[src], bool) or not isinstance(obj[src], (str, int, float) if k == "answer" else str))]
    if missing:
      bad.append((lineno, f"missing {missing}"))
    elif wrong:
      bad.append((lineno, f"{wrong[0]!r} is {type(obj[wrong[0]]).__name__}"))
    else:
      out.append({k: str(obj[src]) for k, src in wanted.items()})
  if bad:
    shown = ", ".join(f"line {n}: {why}" for n, why in bad[:5])
    logging.warning("%s: skipped %d bad line(s) of %d (%s%s)", path, len(bad), len(bad) + len(out),
                    shown, ", ..." if len(bad) > 5 else "")
  if not out:
    raise ValueError(f"{path}: no valid records (keys {sorted(wanted.values())}, {len(bad)} bad lines)")
  return (out, bad) if return_bad else out
