"""Reader for user-supplied JSONL prompt/response files."""

from __future__ import annotations

import json
import logging
import os


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
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file {path!r} not found")
  wanted = {"prompt": prompt_key, "response": response_key, "answer": answer_key}
  wanted = {k: v for k, v in wanted.items() if v is not None}
  out, bad = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        bad.append((lineno, "invalid JSON"))
        continue
      if not isinstance(obj, dict):
        bad.append((lineno, "not an object"))
        continue
      missing = [src for src in wanted.values() if src not in obj or obj[src] is None]
      if missing:
        bad.append((lineno, f"missing {missing}"))
        continue
      out.append({k: str(obj[src]) for k, src in wanted.items()})
  if bad:
    shown = ", ".join(f"line {n}: {why}" for n, why in bad[:5])
    logging.warning("%s: skipped %d bad line(s) of %d (%s%s)", path, len(bad), len(bad) + len(out),
                    shown, ", ..." if len(bad) > 5 else "")
  if not out:
    raise ValueError(f"{path}: no valid records (keys {sorted(wanted.values())}, {len(bad)} bad lines)")
  return (out, bad) if return_bad else out
