"""A random-access view over an array_record data source (`builder.as_data_source(split)`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def decode_value(v):
  """bytes -> str, np.bool_ -> bool; other values unchanged."""
  return v.decode("utf-8") if isinstance(v, bytes) else bool(v) if isinstance(v, np.bool_) else v


class RecordView(Sequence):
  """Indexable, sliceable records with Python values; subclasses override `decode(record)`."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def decode(self, rec: dict) -> dict:
    return {k: decode_value(v) for k, v in rec.items()}

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} records")
    return self.decode(self._source[i % len(self)])

  def __getitems__(self, idxs):
    return [self[i] for i in idxs]
