"""Preference data: pairs and K-wise rankings, validation, file readers, TFDS array_record builder.

Two record kinds, plain dicts of `str` (plus a float margin):

    pair     {"prompt", "chosen", "rejected", "margin", "answer"}   chosen preferred to rejected
    ranking  {"prompt", "responses": [r_best, ..., r_worst], "answer"}   (InstructGPT's K-wise)

`margin` (default 0) is an optional per-pair preference strength used by the margin loss;
`answer` (default "") is an optional gold answer kept for evaluation (the simulated labeler's gold
preference needs it; human data can leave it empty).

Invalid records are never trained on and never crash a run: `validate_records` drops them and
returns a `SkipReport` counting each reason (chosen == rejected, empty prompt/response, K < 2,
duplicate responses in a ranking, overlong prompt/response under the tokenizer), logged once.

Storage: `read_pairs` / `read_rankings` (`read_preferences` with a key mapping) parse user JSONL or
Parquet (`iter_rows`, also the reader of `rlhfjax.data.files`); `PreferenceBuilder` is a TFDS
`GeneratorBasedBuilder` that turns validated JSONL files into array_record and reads them back
with `as_data_source` — NumPy only, no TensorFlow (the approach of `tfds_arithmetic.py`). Rankings
store their responses as one JSON-encoded `Text` feature, so a ranking of any K round-trips as str.

Batches (`collate_preferences`) have a comparison axis K (2 for pairs, chosen first):

    tokens, mask, positions  int32   [B, K, P+R]   prompt left-padded | response right-padded
    valid                    float32 [B, K]        1 on real responses (rankings of mixed K pad)
    margin                   float32 [B]
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from rlhfjax.data.jsonl import iter_objects
from rlhfjax.data.records import RecordView, decode_value

log = logging.getLogger("rlhfjax")

Kind = Literal["pairs", "rankings"]
KINDS = ("pairs", "rankings")


# ---------------------------------------------------------------------------------------------
# Records and validation
# ---------------------------------------------------------------------------------------------


def make_pair(prompt: str, chosen: str, rejected: str, margin: float = 0.0, answer: str = "") -> dict:
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin),
          "answer": answer}


def make_ranking(prompt: str, responses: Sequence[str], answer: str = "") -> dict:
  """`responses` ordered best to worst."""
  return {"prompt": prompt, "responses": list(responses), "answer": answer}


def responses_of(record: dict) -> list[str]:
  """A record's responses best to worst (a pair is a ranking of two)."""
  if "responses" in record:
    return list(record["responses"])
  return [record["chosen"], record["rejected"]]


@dataclasses.dataclass
class SkipReport:
  """How many records were kept and, per reason, how many were skipped (with a few examples)."""

  source: str = ""
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)  # [(index, reason)], the first few

  @property
  def total_skipped(self) -> int:
    return int(sum(self.skipped.values()))

  def add(self, index, reason: str):
    self.skipped[reason] += 1
    if len(self.examples) < 5:
      self.examples.append((index, reason))

  def merge(self, other: "SkipReport") -> "SkipReport":
    self.kept += other.kept
    self.skipped.update(other.skipped)
    self.examples += other.examples[:max(0, 5 - len(self.examples))]
    return self

  def as_dict(self) -> dict:
    return {"kept": self.kept, "skipped": self.total_skipped,
            **{f"skipped_{k.replace(' ', '_').replace('=', 'eq').replace('<', 'lt')}": v
               for k, v in sorted(self.skipped.items())}}

  def log(self):
    if self.total_skipped:
      shown = ", ".join(f"#{i}: {why}" for i, why in self.examples)
      log.warning("%s: skipped %d invalid preference record(s) of %d (%s) e.g. %s", self.source or "data",
                  self.total_skipped, self.total_skipped + self.kept, dict(self.skipped), shown)


def record_problem(record: dict, kind: Kind, *, min_k: int = 2) -> str | None:
  """Why `record` is not a valid `kind` record (None if it is). Text-only checks (no tokenizer)."""
  if not isinstance(record, dict):
    return "not an object"
  prompt = record.get("prompt")
  if not isinstance(prompt, str):
    return "missing prompt"
  if not prompt.strip():
    return "empty prompt"
  if kind == "pairs":
    c, r = record.get("chosen"), record.get("rejected")
    if not isinstance(c, str) or not isinstance(r, str):
      return "missing chosen/rejected"
    if not c.strip() or not r.strip():
      return "empty response"
    if c == r:
      return "chosen == rejected"
    m = record.get("margin", 0.0)
    try:
      if not math.isfinite(float(m)):
        return "non-finite margin"
    except (TypeError, ValueError):
      return "non-finite margin"
    return None
  if kind != "rankings":
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  rs = record.get("responses")
  if not isinstance(rs, (list, tuple)) or not all(isinstance(x, str) for x in rs):
    return "missing responses"
  if len(rs) < min_k:
    return "K < 2"
  if any(not x.strip() for x in rs):
    return "empty response"
  if len(set(rs)) != len(rs):
    return "duplicate responses"
  return None


def validate_records(records: Iterable[dict], kind: Kind, *, tokenizer=None, max_prompt_len: int = 0,
                     max_response_len: int = 0, max_k: int = 0, source: str = "",
                     log_report: bool = True) -> tuple[list[dict], SkipReport]:
  """Keeps the valid records, counting each skipped one by reason.

  Args:
    records: dicts as produced by `make_pair` / `make_ranking` (or read from JSONL).
    kind: "pairs" or "rankings".
    tokenizer: with `max_prompt_len` / `max_response_len` (> 0), prompts of more than
      `max_prompt_len` tokens (incl. bos) and responses of more than `max_response_len` tokens
      (incl. eos) are skipped as overlong rather than silently truncated.
    max_k: rankings with more than `max_k` responses are skipped (0 = no limit).
    source: name used in the log line.
    log_report: log one warning line when something was skipped.

  Returns:
    (kept records, normalized: margin float, answer str), `SkipReport`.
  """
  report = SkipReport(source=source)
  kept = []
  for i, rec in enumerate(records):
    why = record_problem(rec, kind)
    if why is None and kind == "rankings" and max_k and len(rec["responses"]) > max_k:
      why = f"K > {max_k}"
    if why is None and tokenizer is not None:
      if max_prompt_len and len(tokenizer.prompt_ids(rec["prompt"])) > max_prompt_len:
        why = "prompt too long"
      elif max_response_len and any(len(tokenizer.encode(r)) + 1 > max_response_len
                                    for r in responses_of(rec)):
        why = "response too long"
    if why is not None:
      report.add(i, why)
      continue
    out = {"prompt": rec["prompt"], "answer": str(rec.get("answer") or "")}
    if kind == "pairs":
      out.update(chosen=rec["chosen"], rejected=rec["rejected"], margin=float(rec.get("margin", 0.0)))
    else:
      out["responses"] = list(rec["responses"])
    kept.append(out)
  report.kept = len(kept)
  if log_report:
    report.log()
  return kept, report


# ---------------------------------------------------------------------------------------------
# Files: JSONL or Parquet
# ---------------------------------------------------------------------------------------------


def iter_rows(path: str, report: SkipReport) -> Iterator[tuple[str, dict]]:
  """(where, object) per record of a .jsonl file ("line N"; lines that are not JSON objects go to
  `report` as they are reached) or a .parquet file ("row N"; read with pyarrow, imported here)."""
  if not path.endswith(".parquet"):
    for n, obj in iter_objects(path, lambda n, why: report.add(f"line {n}", why)):
      yield f"line {n}", obj
    return
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
  for i, obj in enumerate(pq.read_table(path).to_pylist(), 1):
    yield f"row {i}", obj


def _read_objects(path: str, report: SkipReport) -> list[dict]:
  return [o for _, o in iter_rows(path, report)]


def read_pairs(path: str, *, prompt_key: str = "prompt", chosen_key: str = "chosen",
               rejected_key: str = "rejected", margin_key: str | None = "margin",
               answer_key: str | None = "answer", **validate_kw) -> tuple[list[dict], SkipReport]:
  """Pairs from a .jsonl (one object per line) or .parquet file; bad lines and invalid records are
  counted and skipped.

  `validate_kw` goes to `validate_records` (tokenizer, max_prompt_len, max_response_len).
  Returns (records, SkipReport). A file without a single valid record is an error.
  """
  report = SkipReport(source=path)
  objs = _read_objects(path, report)
  recs = [{"prompt": o.get(prompt_key), "chosen": o.get(chosen_key), "rejected": o.get(rejected_key),
           "margin": o.get(margin_key, 0.0) if margin_key else 0.0,
           "answer": o.get(answer_key, "") if answer_key else ""} for o in objs]
  return _finish(recs, "pairs", report, path, validate_kw)


def read_rankings(path: str, *, prompt_key: str = "prompt", responses_key: str = "responses",
                  answer_key: str | None = "answer", **validate_kw) -> tuple[list[dict], SkipReport]:
  """Rankings from .jsonl / .parquet: `responses` a list ordered best to worst. As `read_pairs`."""
  report = SkipReport(source=path)
  objs = _read_objects(path, report)
  recs = [{"prompt": o.get(prompt_key), "responses": o.get(responses_key),
           "answer": o.get(answer_key, "") if answer_key else ""} for o in objs]
  return _finish(recs, "rankings", report, path, validate_kw)


def _finish(recs, kind, report, path, validate_kw):
  kept, rep = validate_records(recs, kind, source=path, log_report=False, **validate_kw)
  report.merge(rep)
  report.kept = len(kept)
  report.log()
  if not kept:
    raise ValueError(f"{path}: no valid {kind} records ({report.total_skipped} skipped: "
                     f"{dict(report.skipped)})")
  return kept, report


def write_jsonl(path: str, records: Iterable[dict]) -> str:
  """Writes records atomically (tmp file + rename), so a killed run never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def read_preferences(path: str, kind: Kind, *, keys: str = "", **kw) -> tuple[list[dict], SkipReport]:
  """Pairs or rankings from .jsonl / .parquet; `keys` maps our fields to the file's, e.g.
  "prompt=question,chosen=better" (`config.rm.file_keys`)."""
  return (read_pairs if kind == "pairs" else read_rankings)(path, **key_args(keys, kind), **kw)


def key_args(keys: str, kind: Kind) -> dict:
  """"prompt=question,chosen=better" -> {"prompt_key": "question", "chosen_key": "better"}."""
  ours = ("prompt", "chosen", "rejected", "margin", "answer") if kind == "pairs" else (
      "prompt", "responses", "answer")
  out = {}
  for part in filter(None, (p.strip() for p in keys.split(","))):
    name, sep, theirs = part.partition("=")
    if not sep or name.strip() not in ours or not theirs.strip():
      raise ValueError(f"preference file keys {keys!r}: expected ours=theirs with ours in {ours}")
    out[f"{name.strip()}_key"] = theirs.strip()
  return out


# ---------------------------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)
# ---------------------------------------------------------------------------------------------


def _file_digest(paths: Sequence[str]) -> str:
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:12]


def _tfds_classes():
  """The builder classes, created on first use so importing this module does not import TFDS."""
  global _CLASSES
  if _CLASSES is not None:
    return _CLASSES
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class PreferenceBuilderConfig(tfds.core.BuilderConfig):
    """Which JSONL files become the train/test splits, and their kind."""

    kind: str = "pairs"  # "pairs" or "rankings"
    train_path: str = ""  # JSONL of the train split
    test_path: str = ""  # JSONL of the test split

  class PreferenceBuilder(tfds.core.GeneratorBasedBuilder):
    """Preference pairs or rankings from JSONL files, validated, stored as array_record."""

    name = "rlhfjax_preferences"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [PreferenceBuilderConfig(name="pairs_default", kind="pairs")]

    def __init__(self, *, data_dir: str, file_format: str = "array_record", **kwargs):
      super().__init__(data_dir=os.fspath(data_dir), file_format=file_format, **kwargs)

    def _info(self):
      cfg = self.builder_config
      if cfg.kind == "pairs":
        feats = {"prompt": tfds.features.Text(), "chosen": tfds.features.Text(),
                 "rejected": tfds.features.Text(), "margin": np.float32, "answer": tfds.features.Text()}
      else:
        feats = {"prompt": tfds.features.Text(), "responses_json": tfds.features.Text(),
                 "answer": tfds.features.Text()}
      return tfds.core.DatasetInfo(builder=self, description=cfg.description or "",
                                   features=tfds.features.FeaturesDict(feats), supervised_keys=None)

    def _split_generators(self, dl_manager):
      del dl_manager
      cfg = self.builder_config
      return {"train": self._generate_examples(cfg.train_path), "test": self._generate_examples(cfg.test_path)}

    def _generate_examples(self, path):
      recs, _ = read_preferences(path, self.builder_config.kind)
      for i, r in enumerate(recs):
        if "responses" in r:
          yield i, {"prompt": r["prompt"], "responses_json": json.dumps(r["responses"]),
                    "answer": r["answer"]}
        else:
          yield i, {k: r[k] for k in ("prompt", "chosen", "rejected", "margin", "answer")}

  _CLASSES = (PreferenceBuilderConfig, PreferenceBuilder)
  return _CLASSES


_CLASSES = None


def preference_builder(data_dir: str, kind: Kind, train_path: str, test_path: str):
  """A `PreferenceBuilder` for two JSONL files, its config named by a hash of their bytes (so new
  labels never reuse a stale build)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  config_cls, builder_cls = _tfds_classes()
  name = f"{kind}_{_file_digest([train_path, test_path])}"
  cfg = config_cls(name=name, description=f"{kind} from {train_path} / {test_path}", kind=kind,
                   train_path=os.path.abspath(train_path), test_path=os.path.abspath(test_path))
  return builder_cls(data_dir=os.path.expanduser(os.fspath(data_dir)), config=cfg)


class _PreferenceRecords(RecordView):
  """Preference records with str values and rankings' responses as a list."""

  def decode(self, rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
      v = decode_value(v)
      if k == "responses_json":
        out["responses"] = json.loads(v)
      elif k == "margin":
        out[k] = float(v)
      else:
        out[k] = v
    return out


def load_preferences(data_dir: str, kind: Kind, train_path: str, test_path: str
                     ) -> tuple[Sequence[dict], Sequence[dict]]:
  """Builds (on first use) and returns the (train, test) splits as random-access record sequences."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  builder = preference_builder(data_dir, kind, train_path, test_path)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return (_PreferenceRecords(builder.as_data_source(split="train")),
          _PreferenceRecords(builder.as_data_source(split="test")))


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def collate_preferences(records: Sequence[dict], tokenizer, max_prompt_len: int, max_response_len: int,
                        k: int | None = None) -> dict[str, np.ndarray]:
  """Tokenized comparison batch (layout in the module docstring), vectorized over all B*K responses.

  Args:
    records: pairs (K = 2, chosen first) or rankings (best first).
    tokenizer: the run's `Tokenizer`.
    max_prompt_len: P; longer prompts raise (validate first).
    max_response_len: R; longer responses are truncated (validate first to skip them instead).
    k: the comparison axis size; rankings with fewer responses are padded with `valid` 0
      (default: the largest K in `records`).
  """
  resp = [responses_of(r) for r in records]
  k = k or max(len(x) for x in resp)
  if any(len(x) > k for x in resp):
    raise ValueError(f"a record has more than k={k} responses")
  b = len(records)
  valid = np.zeros((b, k), np.float32)
  flat = []
  for i, x in enumerate(resp):
    valid[i, :len(x)] = 1.0
    flat += x + [x[-1]] * (k - len(x))  # padding slots repeat a real response (masked by `valid`)
  prompt_ids, prompt_mask = tokenizer.encode_prompts([r["prompt"] for r in records], max_prompt_len)
  response_ids, response_mask = tokenizer.encode_responses(flat, max_response_len)
  rep = lambda x: np.repeat(x, k, axis=0)  # noqa: E731  [B, P] -> [B*K, P]
  tokens = np.concatenate([rep(prompt_ids), response_ids], axis=1)
  mask = np.concatenate([rep(prompt_mask), response_mask], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
  t = tokens.shape[1]
  return {
      "tokens": tokens.reshape(b, k, t).astype(np.int32),
      "mask": mask.reshape(b, k, t).astype(np.int32),
      "positions": positions.reshape(b, k, t).astype(np.int32),
      "valid": valid,
      "margin": np.asarray([float(r.get("margin", 0.0)) for r in records], np.float32),
  }
