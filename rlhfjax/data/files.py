"""Examples from user data files (JSONL; Parquet when pyarrow is installed) through a field mapping.

`fields` maps our keys to the file's keys, e.g. {"prompt": "question", "answer": "answer"} (GSM8K):

    prompt    the question (str)                    } exactly one of the two; from "messages",
    messages  a chat, [{"role", "content"}, ...]    } "prompt" is the turns before a final assistant
                                                      turn and "response" that turn's content
    answer    gold final answer (str or number) for verifiers, stored as str
    response  SFT target text
    tests     anything (e.g. a code task's unit tests), kept as-is

Every mapped field is required: a record lacking one or of a wrong type, or a line that is not a JSON
object, is counted in a `SkipReport` by line number; more than `max_bad_fraction` bad is a one-line
ValueError while reading (before any training). GSM8K answers ("... <<48/2=24>>24 clips ... #### 72")
give "answer" "72" and, unless one is mapped, a "response" (`parse_gsm8k`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from typing import Mapping

import numpy as np

from rlhfjax.data.preferences import SkipReport, iter_rows

log = logging.getLogger("rlhfjax")
KEYS = ("messages", "prompt", "response", "answer", "tests")  # the order records are filled in
ANSWER_FORMATS = ("auto", "gsm8k", "plain")
_CALC_RE = re.compile(r"<<[^<>]*>>")


class _Bad(ValueError):
  """A record that cannot become an example; the message is the reason counted."""


def sample_path() -> str:
  """The shipped GSM8K-format file: 42 hand-written word problems, fields "question" / "answer"."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_sample.jsonl")


def parse_gsm8k(text: str) -> tuple[str, str]:
  """(final answer, response) of a GSM8K answer: the text after the last "####" without thousands
  commas, and the steps without `<<...>>` calculator annotations, then "The answer is N." (the form
  `rlhfjax.rewards.math.extract_answer` reads first after a boxed answer)."""
  steps, sep, final = text.rpartition("####")
  final = final.strip().replace(",", "")
  if not sep or not final:
    raise _Bad("no '#### N' final answer")
  steps = _CALC_RE.sub("", steps).strip()
  return final, (steps + "\n" if steps else "") + f"The answer is {final}."


def _example(obj: dict, fields: dict, answer_format: str) -> dict:
  ex = {}
  for ours, theirs in fields.items():
    v = obj.get(theirs)
    if v is None:
      raise _Bad(f"missing {theirs!r}")
    if ours == "messages":
      if not (isinstance(v, list) and v and all(
          isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
          for m in v)):
        raise _Bad(f"{theirs!r} not a list of role/content messages")
      if v[-1]["role"] == "assistant":
        ex["response"], v = v[-1]["content"], v[:-1]
      if not v:
        raise _Bad(f"{theirs!r} has no prompt turn")
      ex["prompt"] = [{"role": m["role"], "content": m["content"]} for m in v]
    elif ours == "tests":
      ex["tests"] = v
    elif isinstance(v, bool) or not isinstance(v, (str, int, float) if ours == "answer" else str):
      raise _Bad(f"{theirs!r} is {type(v).__name__}")
    elif not str(v).strip():
      raise _Bad(f"empty {theirs!r}")
    elif ours == "answer" and isinstance(v, str) and (
        answer_format == "gsm8k" or (answer_format == "auto" and "####" in v)):
      ex["answer"], response = parse_gsm8k(v)
      ex.setdefault("response", response)
    else:
      ex[ours] = str(v).strip() if ours == "answer" else v
  return ex


def read_examples(path: str, fields: Mapping[str, str], *, max_bad_fraction: float = 0.0,
                  answer_format: str = "auto") -> tuple[list[dict], SkipReport]:
  """Reads every record of `path` into an example dict (see the module docstring).

  Args:
    path: a .jsonl file (one object per line) or a .parquet file.
    fields: our key -> the file's key (dict or ConfigDict); keys from KEYS, "prompt" or "messages".
    max_bad_fraction: the largest share of bad records tolerated; more raises ValueError.
    answer_format: "gsm8k" (answers end "#### N"), "plain" (kept as-is), "auto" (gsm8k when "####").

  Returns:
    (examples, SkipReport counting the bad records by reason, with the first few line numbers).
  """
  fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields)
  if set(fields) - set(KEYS) or ("prompt" in fields) == ("messages" in fields):
    raise ValueError(f"fields {fields} must map 'prompt' or 'messages' (not both), and only {KEYS}")
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
  fields = {k: fields[k] for k in KEYS if k in fields}
  report, out = SkipReport(source=path), []
  for where, obj in iter_rows(path, report):
    try:
      out.append(_example(obj, fields, answer_format))
    except _Bad as e:
      report.add(where, str(e))
  report.kept, bad = len(out), report.total_skipped
  if not out or bad / (bad + len(out)) > max_bad_fraction:
    first = "; first: %s: %s" % report.examples[0] if report.examples else ""
    raise ValueError(f"{path}: {bad} of {bad + len(out)} records bad (max_bad_fraction="
                     f"{max_bad_fraction}, fields {fields}){first}")
  return out, report


def drop_long_prompts(examples: list[dict], tokenizer, max_prompt_len: int, *, max_bad_fraction: float = 0.0,
                      source: str = "data") -> list[dict]:
  """`examples` without those whose prompt is longer than `max_prompt_len` tokens (as the batches
  encode it: bos and chat template included), checked when the data is read: a long prompt would
  otherwise stop the run at the batch that holds it. More than `max_bad_fraction` of them is a
  one-line ValueError naming the longest; fewer are dropped with a warning."""
  if not examples:
    return examples
  lengths = np.asarray([len(tokenizer.prompt_ids(e["prompt"])) for e in examples])
  long = lengths > max_prompt_len
  if not long.any():
    return examples
  worst = int(lengths.argmax())
  what = (f"{source}: {int(long.sum())} of {len(examples)} prompts longer than max_prompt_len={max_prompt_len} "
          f"tokens (the longest {int(lengths[worst])}: {str(examples[worst]['prompt'])[:80]!r})")
  if long.mean() > max_bad_fraction:
    raise ValueError(f"{what}; raise config.data.max_prompt_len, shorten them, or allow dropping them with "
                     f"config.data.max_bad_fraction (now {max_bad_fraction})")
  log.warning("%s: dropped", what)
  return [e for e, x in zip(examples, long) if not x]


def split_examples(examples: list[dict], test_fraction: float) -> tuple[list[dict], list[dict]]:
  """(train, test) by a stable hash of each prompt: the same prompt always lands in the same split."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  cut = round(test_fraction * 10_000)
  is_test = [zlib.crc32(json.dumps(e["prompt"], sort_keys=True).encode()) % 10_000 < cut
             for e in examples]
  return ([e for e, t in zip(examples, is_test) if not t], [e for e, t in zip(examples, is_test) if t])


def load_file_data(data_config) -> tuple[list[dict], list[dict]]:
  """(train, test) examples from the files `data_config` (a ConfigDict or dict) names.

  Keys read:
    source: "file" (pipeline.load_data's switch to this loader; anything else is an error here).
    train_path: the .jsonl / .parquet training file, e.g. `sample_path()`.
    test_path: the held-out file; "" = split train_path by a hash of the prompt.
    fields: our key -> the file's key, e.g. {"prompt": "question", "answer": "answer"}.
    max_bad_fraction: the largest share of bad records tolerated per file (default 0.0).
    test_fraction: share of train_path hashed into test when test_path is "" (default 0.1).
    answer_format: "auto" (default), "gsm8k" or "plain".
  """
  d = data_config
  if d.get("source", "file") != "file":
    raise ValueError(f"load_file_data needs data.source='file', got {d.get('source')!r}")
  kw = dict(fields=d["fields"], max_bad_fraction=d.get("max_bad_fraction", 0.0),
            answer_format=d.get("answer_format", "auto"))
  paths = [d["train_path"]] + ([d["test_path"]] if d.get("test_path") else [])
  splits = []
  for path in paths:
    examples, rep = read_examples(path, **kw)
    splits.append(examples)
    log.log(logging.WARNING if rep.total_skipped else logging.INFO, "%s: %d examples, %d bad %s e.g. %s",
            path, rep.kept, rep.total_skipped, dict(rep.skipped), rep.examples)
  train, test = splits if len(splits) == 2 else split_examples(splits[0], d.get("test_fraction", 0.1))
  if not train or not test:
    raise ValueError(f"{paths}: {len(train)} train / {len(test)} test examples; "
                     "set data.test_path or change data.test_fraction")
  return train, test
