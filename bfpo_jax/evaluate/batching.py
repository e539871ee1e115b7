"""Scoring requests -> a few fixed-shape batches (bucketed or packed rows).

A scoring row is what the model reads and what is scored: ``inputs`` (at most
``max_length`` tokens), ``labels`` (the next token after each input) and the
number of trailing positions whose log-probs count (the continuation). Rows
are laid out in one of two ways:

* bucketed: sorted by length (longest first, as the harness's ``hf``
  backend does), ``rows_per_batch`` to a batch, right-padded to a bucket
  length (a power of two, at most ``max_length``): about log2(max_length)
  compiled shapes at most.
* packed: rows best-fit-decreasing into lines of one bucket length, each
  row its own segment (attention stays within it, positions restart), as
  Levanter's harness backend packs: fewer padded tokens, one compiled shape.

Everything here is numpy; :mod:`bfpo_jax.evaluate.engine` runs the batches.
Dimension names: R rows of a batch, T tokens.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Row:
  """One scoring row: position t reads ``inputs[t]`` and predicts ``labels[t]``."""

  inputs: tuple[int, ...]
  labels: tuple[int, ...]
  n_scored: int  # the last n_scored positions are the continuation


def scoring_row(context: list[int], continuation: list[int],
                max_length: int) -> Row:
  """The row the harness's ``hf`` backend scores for one request.

  Context + continuation are cut from the left to ``max_length + 1`` tokens;
  the model reads all but the last and predicts all but the first.

  Raises:
    ValueError: empty context or continuation, or a continuation longer than
      ``max_length`` (the harness refuses these too).
  """
  if not context or not continuation:
    raise ValueError("a scoring request needs a context and a continuation")
  if len(continuation) > max_length:
    raise ValueError(f"continuation of {len(continuation)} tokens exceeds "
                     f"max_length {max_length}")
  tokens = (list(context) + list(continuation))[-(max_length + 1):]
  return Row(tuple(tokens[:-1]), tuple(tokens[1:]), len(continuation))


def bucket_length(n: int, max_length: int) -> int:
  """The padded length of a row of ``n <= max_length`` tokens: the next power
  of two (at least 16), capped at ``max_length``."""
  bucket = MIN_BUCKET
  while bucket < n:
    bucket *= 2
  return min(bucket, max_length)


@dataclasses.dataclass
class Batch:
  """Arrays [R, T] for the model, and where each request's tokens landed."""

  input_ids: np.ndarray  # int32, 0 on padding
  labels: np.ndarray  # int32
  score_mask: np.ndarray  # bool: continuation positions
  segment_ids: np.ndarray  # int32: 1, 2, ... per row in a line; 0 = padding
  placements: list  # (request index, line, start, end) of scored positions


def _empty(rows_per_batch, length):
  return Batch(np.zeros((rows_per_batch, length), np.int32),
               np.zeros((rows_per_batch, length), np.int32),
               np.zeros((rows_per_batch, length), bool),
               np.zeros((rows_per_batch, length), np.int32), [])


def _place(batch, line, start, segment, index, row):
  n = len(row.inputs)
  batch.input_ids[line, start:start + n] = row.inputs
  batch.labels[line, start:start + n] = row.labels
  batch.segment_ids[line, start:start + n] = segment
  batch.score_mask[line, start + n - row.n_scored:start + n] = True
  batch.placements.append((index, line, start + n - row.n_scored, start + n))


def bucketed_batches(rows: list[Row], rows_per_batch: int, max_length: int):
  """Yields :class:`Batch` es of ``rows_per_batch`` rows, longest first."""
  order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].inputs), i))
  for start in range(0, len(order), rows_per_batch):
    chunk = order[start:start + rows_per_batch]
    batch = _empty(rows_per_batch,
                   bucket_length(len(rows[chunk[0]].inputs), max_length))
    for line, index in enumerate(chunk):
      _place(batch, line, 0, 1, index, rows[index])
    yield batch


def packed_batches(rows: list[Row], rows_per_batch: int, max_length: int):
  """Yields :class:`Batch` es of lines holding several rows each.

  Lines are ``bucket_length`` of the longest row, so every batch has the
  same shape; rows go best-fit, longest first (into the fullest line with
  room).
  """
  if not rows:
    return
  order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].inputs), i))
  length = bucket_length(len(rows[order[0]].inputs), max_length)
  lines = []  # row indices per line
  room = []  # sorted (free tokens, line) of lines
  for index in order:
    n = len(rows[index].inputs)
    at = bisect.bisect_left(room, (n, -1))
    if at == len(room):
      lines.append([index])
      bisect.insort(room, (length - n, len(lines) - 1))
      continue
    free, line = room.pop(at)
    lines[line].append(index)
    bisect.insort(room, (free - n, line))
  for start in range(0, len(lines), rows_per_batch):
    batch = _empty(rows_per_batch, length)
    for line_index, members in enumerate(lines[start:start + rows_per_batch]):
      offset = 0
      for segment, index in enumerate(members, start=1):
        _place(batch, line_index, offset, segment, index, rows[index])
        offset += len(rows[index].inputs)
    yield batch


def padding_share(batches: list[Batch]) -> float:
  """Fraction of the batches' token slots that hold no real token."""
  total = sum(b.segment_ids.size for b in batches)
  real = sum(int((b.segment_ids > 0).sum()) for b in batches)
  return 1.0 - real / max(total, 1)
