"""JSONL: the one line-by-line object reader (`iter_objects`), and prompt/response files (`read_jsonl`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator


def iter_objects(path: str, on_bad: Callable[[int, str], None]) -> Iterator[tuple[int, dict]]:
  """Yields (line number, object) for each line of `path` that is a JSON object, in order.

  Blank lines are skipped; any other line calls `on_bad(line_number, reason)` ("invalid JSON" or
  "not an object") when it is reached, so reports built from both see bad lines in file order.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        on_bad(lineno, "invalid JSON")
        continue
      if isinstance(obj, dict):
        yield lineno, obj
      else:
        on_bad(lineno, "not an object")


def read_jsonl(
    path: str,
    *,
    prompt_key: str = "prompt",
    response_key: str | None = "response",
    answer_key: str | None = None,
    return_bad: bool = False,
) -> list[dict] | tuple[list[dict], list[tuple[int, str]]]:
  """Reads one JSON object per line into dicts {"prompt", ["response"], ["answer"]} of str.

  Blank lines are skipped. Lines that are not valid JSON objects, or that lack a requested key,
  are counted and reported in one warning (with the first few line numbers), not fatal; a file
  with no valid line at all is an error.

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
    if missing:
      bad.append((lineno, f"missing {missing}"))
    else:
      out.append({k: str(obj[src]) for k, src in wanted.items()})
  if bad:
    shown = ", ".join(f"line {n}: {why}" for n, why in bad[:5])
    logging.warning("%s: skipped %d bad line(s) of %d (%s%s)", path, len(bad), len(bad) + len(out),
                    shown, ", ..." if len(bad) > 5 else "")
  if not out:
    raise ValueError(f"{path}: no valid records (keys {sorted(wanted.values())}, {len(bad)} bad lines)")
  return (out, bad) if return_bad else out
