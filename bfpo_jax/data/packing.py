"""Packed preference pairs: each shared prompt once, several pairs per row.

A pair (prompt ``p_0 .. p_k``, chosen response ``c``, rejected ``r``) is laid
out once, and pairs are packed first-fit into rows of ``length`` tokens::

    tokens     p_0 .. p_{k-1} | p_k c_0 .. c_m | p_k r_0 .. r_n | next pair ..
    branch_ids 0 ........... 0 | 1 ........... 1 | 2 ........... 2 |
    positions  0 ......... k-1 | k k+1 ..... k+m+1 | k k+1 ... k+n+1 |
    segment_ids s (the pair's slot in the row + 1) throughout; 0 = padding

Attention (``model.attention.attention_mask``) lets a token see the earlier
tokens of its own segment that are prompt (branch 0) or of its own branch:
rejected tokens see the prompt and themselves, never the chosen ones. Each
branch opens with its own copy of the last prompt token, so the hidden state
that predicts ``c_0`` and the one that predicts ``r_0`` each sit just before
it and have seen exactly the prompt; with positions continuing from the
prompt, every response log-prob equals that of the unpacked, right-padded
``[prompt | response]`` row. A pair takes ``prompt + chosen + rejected + 1``
tokens, and under the trl truncation rule at most ``2 * max_length``, so a
row of that length holds any pair.

The batch (``B`` rows of ``T`` tokens, ``M = pairs_per_row`` slots a row):

* ``input_ids``, ``positions``, ``segment_ids``, ``branch_ids`` [B, T] int32,
  ``attention_mask`` [B, T] bool (a pair's token, not padding), ``loss_mask``
  [B, T] bool (the response tokens, each branch's prompt-token copy
  excluded);
* per slot [B, M]: ``chosen_is_safe``, ``rejected_is_safe``, ``weight`` (1 for
  a pair, 0 for an empty slot), ``pair_index`` (the pair's index in the
  packed list, -1 if empty) and, when the examples carry them,
  ``reference_chosen_logps`` / ``reference_rejected_logps``.

``T`` is one of a few row lengths (the padded path's buckets below
``pack_length``, and ``pack_length``): the one whose rows have the fewest
token slots. ``B`` is the smallest multiple of ``rows_multiple`` that holds
the pairs, so every data-parallel device and microbatch gets the same number
of rows; there is at most one row per pair, so a packed batch never has more
tokens than the same pairs padded to ``pack_length / 2`` each.
"""

from __future__ import annotations

import math

import numpy as np

from bfpo_jax.data.sources import DataError

LAYOUTS = ("padded", "packed")


def pair_tokens(example) -> int:
  """Tokens a tokenized pair takes in a packed row."""
  return (len(example["chosen_ids"]) + len(example["rejected_ids"])
          - example["prompt_length"] + 1)


def first_fit(sizes, length, pairs_per_row):
  """Bins of indices into ``sizes``: first-fit, longest first.

  Each bin holds at most ``pairs_per_row`` items summing to at most
  ``length``; bins are in order of creation and items in each bin in the
  order placed.
  """
  rows, room = [], []
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    if sizes[i] > length:
      raise DataError(f"a pair of {sizes[i]} tokens does not fit a packed row "
                      f"of {length} (data.pack_length)")
    for row, left in enumerate(room):
      if sizes[i] <= left and len(rows[row]) < pairs_per_row:
        rows[row].append(i)
        room[row] -= sizes[i]
        break
    else:
      rows.append([i])
      room.append(length - sizes[i])
  return rows


def _lay_out(example):
  """Token ids, branch ids, positions and loss flags of one pair."""
  k = example["prompt_length"]
  if k < 1:
    raise DataError("a packed pair needs at least one prompt token")
  chosen, rejected = example["chosen_ids"], example["rejected_ids"]
  ids = list(chosen[: k - 1])
  branch, positions, loss = [0] * (k - 1), list(range(k - 1)), [False] * (k - 1)
  for b, side in ((1, chosen), (2, rejected)):
    branch_tokens = list(side[k - 1:])  # the last prompt token + the response
    ids += branch_tokens
    branch += [b] * len(branch_tokens)
    positions += list(range(k - 1, len(side)))
    loss += [False] + [True] * (len(branch_tokens) - 1)
  return ids, branch, positions, loss


def choose_rows(sizes, lengths, pairs_per_row, rows_multiple=1):
  """``(row_length, row_count, rows)`` packing pairs of ``sizes`` tokens.

  Of the row lengths in ``lengths`` that hold the longest pair, the one whose
  first-fit rows, rounded up to a multiple of ``rows_multiple``, have the
  fewest token slots (the shorter on a tie: attention grows with its square).
  """
  best = None
  for length in sorted(set(lengths)):
    if length < max(sizes):
      continue
    rows = first_fit(sizes, length, pairs_per_row)
    count = max(1, math.ceil(len(rows) / rows_multiple)) * rows_multiple
    if best is None or count * length < best[0] * best[1]:
      best = (length, count, rows)
  if best is None:
    raise DataError(f"a pair of {max(sizes)} tokens does not fit a packed row "
                    f"of {max(lengths)} (data.pack_length)")
  return best


def pack_pairs(examples, *, length, pairs_per_row, rows_multiple=1, pad_id=0,
               buckets=()):
  """Tokenized pairs (``data.tokenize.tokenize_pair``) -> one packed batch.

  Args:
    examples: the pairs of one batch.
    length: the longest row (T); every pair must fit one.
    pairs_per_row: slots per row (M); a row never holds more pairs.
    rows_multiple: the row count B is rounded up to a multiple of this.
    pad_id: token id of padding.
    buckets: shorter row lengths to consider (``choose_rows``), so a batch
      of short pairs does not run long, mostly empty rows.

  Returns:
    The batch dict of the module docstring.
  """
  lengths = [b for b in buckets if b < length] + [length]
  length, n_rows, rows = choose_rows([pair_tokens(e) for e in examples],
                                     lengths, pairs_per_row, rows_multiple)
  shape, slots = (n_rows, length), (n_rows, pairs_per_row)
  batch = {"input_ids": np.full(shape, pad_id, np.int32),
           "positions": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32),
           "branch_ids": np.zeros(shape, np.int32),
           "attention_mask": np.zeros(shape, bool),
           "loss_mask": np.zeros(shape, bool),
           "chosen_is_safe": np.zeros(slots, bool),
           "rejected_is_safe": np.zeros(slots, bool),
           "weight": np.zeros(slots, np.float32),
           "pair_index": np.full(slots, -1, np.int32)}
  reference = "reference_chosen_logps" in examples[0]
  if reference:
    for side in ("chosen", "rejected"):
      batch[f"reference_{side}_logps"] = np.zeros(slots, np.float32)
  for r, row in enumerate(rows):
    start = 0
    for slot, i in enumerate(row):
      e = examples[i]
      ids, branch, positions, loss = _lay_out(e)
      span = slice(start, start + len(ids))
      batch["input_ids"][r, span] = ids
      batch["positions"][r, span] = positions
      batch["segment_ids"][r, span] = slot + 1
      batch["branch_ids"][r, span] = branch
      batch["loss_mask"][r, span] = loss
      batch["attention_mask"][r, span] = True
      start += len(ids)
      for side in ("chosen", "rejected"):
        batch[f"{side}_is_safe"][r, slot] = e[f"{side}_is_safe"]
        if reference:
          key = f"reference_{side}_logps"
          batch[key][r, slot] = e[key]
      batch["weight"][r, slot] = 1.0
      batch["pair_index"][r, slot] = i
  return batch


def pack_share(examples, *, length, pairs_per_row, rows_multiple, pad_id,
               buckets=(), process_index=0, process_count=1):
  """This process's rows of one global batch, packed.

  Every process packs the whole global batch the same way, so all agree on
  the row count and length (the same program everywhere), then keeps rows
  ``process_index::process_count``.
  """
  multiple = math.lcm(rows_multiple, process_count)
  batch = pack_pairs(examples, length=length, pairs_per_row=pairs_per_row,
                     rows_multiple=multiple, pad_id=pad_id, buckets=buckets)
  return {k: v[process_index::process_count] for k, v in batch.items()}


def padding_share(batch) -> float:
  """Fraction of a batch's token slots that hold no token of a pair.

  A padded batch counts both rows of a pair (its prompt twice), a packed one
  each row; either way the tokens a pair needs are ``prompt + chosen +
  rejected`` (plus one in a packed row).
  """
  if "segment_ids" in batch:
    tokens = batch["segment_ids"] > 0
  else:
    tokens = np.concatenate([batch["chosen_attention_mask"],
                             batch["rejected_attention_mask"]])
  return 1.0 - float(np.mean(tokens))
