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
Dimension names (R lines of a batch, Y scored tokens of a line) are listed in
:mod:`bfpo_jax`.
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
  """A batch of lines [R, T] for the model, and the scored positions [R, Y].

  Only the scored positions (continuations) reach the unembedding: their
  hidden states are gathered into a compact [R, Y] layout first, Y being a
  bucket length of the most scored tokens any line holds.
  """

  input_ids: np.ndarray  # [R, T] int32, 0 on padding
  segment_ids: np.ndarray  # [R, T] int32: 1, 2, ... per row in a line; 0 pad
  score_positions: np.ndarray  # [R, Y] int32: where each scored token is read
  labels: np.ndarray  # [R, Y] int32: the token predicted there
  score_mask: np.ndarray  # [R, Y] bool: a real scored token
  placements: list  # (request index, line, start, end) in the [R, Y] layout


def _batch(lines, rows, rows_per_batch, length):
  """Lays out ``lines`` (row indices each, in order) as a :class:`Batch`."""
  scored = max(sum(rows[i].n_scored for i in members) for members in lines)
  width = bucket_length(scored, length)
  batch = Batch(np.zeros((rows_per_batch, length), np.int32),
                np.zeros((rows_per_batch, length), np.int32),
                np.zeros((rows_per_batch, width), np.int32),
                np.zeros((rows_per_batch, width), np.int32),
                np.zeros((rows_per_batch, width), bool), [])
  for line, members in enumerate(lines):
    offset = used = 0
    for segment, index in enumerate(members, start=1):
      row = rows[index]
      n, k = len(row.inputs), row.n_scored
      batch.input_ids[line, offset:offset + n] = row.inputs
      batch.segment_ids[line, offset:offset + n] = segment
      batch.score_positions[line, used:used + k] = np.arange(offset + n - k,
                                                             offset + n)
      batch.labels[line, used:used + k] = row.labels[n - k:]
      batch.score_mask[line, used:used + k] = True
      batch.placements.append((index, line, used, used + k))
      offset, used = offset + n, used + k
  return batch


def _longest_first(rows):
  return sorted(range(len(rows)), key=lambda i: (-len(rows[i].inputs), i))


def bucketed_batches(rows: list[Row], rows_per_batch: int, max_length: int):
  """Yields :class:`Batch` es of ``rows_per_batch`` rows, longest first."""
  order = _longest_first(rows)
  for start in range(0, len(order), rows_per_batch):
    chunk = order[start:start + rows_per_batch]
    yield _batch([[i] for i in chunk], rows, rows_per_batch,
                 bucket_length(len(rows[chunk[0]].inputs), max_length))


def packed_batches(rows: list[Row], rows_per_batch: int, max_length: int):
  """Yields :class:`Batch` es of lines holding several rows each.

  Lines are ``bucket_length`` of the longest row, so every batch has the
  same length; rows go best-fit, longest first (into the fullest line with
  room).
  """
  if not rows:
    return
  order = _longest_first(rows)
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
    yield _batch(lines[start:start + rows_per_batch], rows, rows_per_batch,
                 length)


def padding_share(batches: list[Batch]) -> float:
  """Fraction of the batches' token slots that hold no real token."""
  total = sum(b.segment_ids.size for b in batches)
  real = sum(int((b.segment_ids > 0).sum()) for b in batches)
  return 1.0 - real / max(total, 1)
