"""Records -> tokenized examples -> grain batches in the train step's layout.

:func:`prepare` reads, validates and tokenizes every source once, counting
what it skips (the same report the data CLI prints). :func:`batches` turns the
examples into an endless, deterministic, per-process grain dataset of padded
batches; its iterator's ``get_state()``/``set_state()`` resume at exactly the
next batch.
"""

from __future__ import annotations

import concurrent.futures
import functools

import grain
import numpy as np

from bfpo_jax.data import packing
from bfpo_jax.data.sources import DataError, Skip, SourceSpec, load_records
from bfpo_jax.data.tokenize import (
    SFT_LOSSES,
    TEMPLATES,
    TRUNCATIONS,
    make_chat,
    tokenize_pair,
    tokenize_sft,
)

MIXTURES = ("concat", "weighted")
PACK_MODES = ("stream", "examples")
DEFAULT_BUCKETS = (384, 512, 768, 1024)
"""Padded lengths at the recipe's 1024 tokens: of the sets of at most four,
the one with the fewest padded tokens on the paper's length mix
(benchmarks/packing.py, docs/BENCHMARKS.md)."""


def _tokenize_chunk(tokenizer, task, options, records):
  chat = make_chat(tokenizer, options["template"])
  out = []
  for record in records:
    try:
      if task == "sft":
        out.append(tokenize_sft(chat, record, max_length=options["max_length"],
                                loss=options["sft_loss"]))
      else:
        out.append(tokenize_pair(
            chat, record, max_prompt_length=options["max_prompt_length"],
            max_length=options["max_length"],
            truncation=options["truncation"]))
    except Skip as s:
      out.append(s.args[0])
  return out


def _length_stats(lengths):
  if not lengths:
    return {}
  a = np.asarray(lengths)
  return {"min": int(a.min()), "mean": round(float(a.mean()), 1),
          "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)),
          "max": int(a.max())}


def token_length_stats(examples, task):
  if task == "sft":
    return {"sequence": _length_stats([len(e["input_ids"]) for e in examples])}
  return {
      "prompt": _length_stats([e["prompt_length"] for e in examples]),
      "chosen": _length_stats([len(e["chosen_ids"]) for e in examples]),
      "rejected": _length_stats([len(e["rejected_ids"]) for e in examples]),
  }


def prepare(specs: list[SourceSpec], tokenizer, *, task: str,
            max_prompt_length=512, max_length=1024, seed=0, num_workers=0,
            template="reference", truncation="trl", sft_loss="all"):
  """Reads, validates and tokenizes sources for one task.

  Args:
    specs: the sources; each must serve ``task``.
    tokenizer: a ``transformers`` tokenizer (Zephyr template applied here).
    task: ``"preference"`` or ``"sft"``.
    max_prompt_length: prompt tokens kept when a pair is too long.
    max_length: tokens of prompt + response (an SFT example: None = uncut).
    seed: seed of each source's ``limit`` subsample.
    num_workers: processes for tokenization (0: in this process).
    template: ``reference`` or ``generation`` (see ``data.tokenize``).
    truncation: ``trl`` or ``prompt_first`` (see ``data.tokenize``).
    sft_loss: ``all`` or ``assistant`` tokens in an SFT example's loss.

  Returns:
    ``(examples_by_source, report)``: lists of tokenized examples, and a dict
    per source name with rows read/kept/used, skips by reason and token
    length statistics.
  """
  for name, value, allowed in (("template", template, TEMPLATES),
                               ("truncation", truncation, TRUNCATIONS),
                               ("sft_loss", sft_loss, SFT_LOSSES)):
    if value not in allowed:
      raise DataError(f"{name} must be one of {allowed}, got {value!r}")
  if task == "preference" and max_prompt_length >= max_length:
    raise DataError(f"max_prompt_length ({max_prompt_length}) must be below "
                    f"max_length ({max_length})")
  options = dict(template=template, truncation=truncation, sft_loss=sft_loss,
                 max_prompt_length=max_prompt_length, max_length=max_length)
  examples_by_source, report = [], {}
  for spec in specs:
    if spec.task != task:
      raise DataError(f"{spec.path}: source is for the {spec.task!r} task, "
                      f"this stage needs {task!r}")
    records, source_report = load_records(spec, seed)
    fn = functools.partial(_tokenize_chunk, tokenizer, task, options)
    try:
      if num_workers and len(records) > 2000:
        chunks = [records[i:i + 1000] for i in range(0, len(records), 1000)]
        with concurrent.futures.ProcessPoolExecutor(num_workers) as pool:
          results = [x for chunk in pool.map(fn, chunks) for x in chunk]
      else:
        results = fn(records)
    except DataError as e:  # a row the chat template cannot render
      raise DataError(f"{spec.name}: {e}") from None
    examples = []
    for result in results:
      if isinstance(result, str):
        source_report.skip(result)
      else:
        examples.append(result)
    source_report.rows_used = len(examples)
    entry = source_report.as_dict()
    entry["token_lengths"] = token_length_stats(examples, task)
    report[spec.name] = entry
    examples_by_source.append(examples)
  return examples_by_source, report


# --------------------------------------------------------------------------- #
# Collation
# --------------------------------------------------------------------------- #


def bucket_length(n, buckets):
  """Smallest bucket >= n (the last bucket if none is)."""
  for b in sorted(buckets):
    if n <= b:
      return b
  return max(buckets)


def _pad(rows, length, pad_id):
  ids = np.full((len(rows), length), pad_id, np.int32)
  attention = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
    attention[i, : len(row)] = True
  return ids, attention


def collate_pairs(examples, *, buckets, pad_id):
  """Preference examples -> the train step's batch dict (right-padded)."""
  longest = max(max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                for e in examples)
  length = bucket_length(longest, buckets)
  batch = {}
  for side in ("chosen", "rejected"):
    ids, attention = _pad([e[f"{side}_ids"] for e in examples], length, pad_id)
    prompt = np.array([e["prompt_length"] for e in examples])[:, None]
    batch[f"{side}_input_ids"] = ids
    batch[f"{side}_attention_mask"] = attention
    batch[f"{side}_loss_mask"] = attention & (np.arange(length)[None] >= prompt)
    batch[f"{side}_is_safe"] = np.array([e[f"{side}_is_safe"] for e in examples])
  batch["weight"] = np.ones(len(examples), np.float32)
  if "reference_chosen_logps" in examples[0]:
    for side in ("chosen", "rejected"):
      key = f"reference_{side}_logps"
      batch[key] = np.array([e[key] for e in examples], np.float32)
  return batch


def collate_sft(examples, *, buckets, pad_id):
  """SFT examples -> ``input_ids``, ``attention_mask``, ``loss_mask`` (and
  ``segment_ids`` for packed rows)."""
  length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
  ids, attention = _pad([e["input_ids"] for e in examples], length, pad_id)
  loss = np.zeros_like(attention)
  for i, e in enumerate(examples):
    loss[i, : len(e["loss_mask"])] = e["loss_mask"]
  batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
  if "segment_ids" in examples[0]:
    segments = np.zeros(ids.shape, np.int32)
    for i, e in enumerate(examples):
      segments[i, : len(e["segment_ids"])] = e["segment_ids"]
    batch["segment_ids"] = segments
  return batch


def pack_stream(examples_by_source, max_length, seed=0):
  """Packs SFT examples as the reference's trl ``ConstantLengthDataset``.

  All examples, in one seeded random order, are concatenated into a single
  token stream and cut into rows of exactly ``max_length`` tokens; the last,
  shorter row is dropped. Attention and positions run across example
  boundaries and every token is trained (labels = inputs), as in the
  reference. (trl drops a short remainder once per buffer of ~2M tokens
  rather than once at the end.)
  """
  examples = [e for source in examples_by_source for e in source]
  stream = [t for i in np.random.default_rng(seed).permutation(len(examples))
            for t in examples[i]["input_ids"]]
  return [{"input_ids": stream[start:start + max_length],
           "loss_mask": [True] * max_length}
          for start in range(0, len(stream) - max_length + 1, max_length)]


def pack_sft(examples, max_length, seed=0):
  """Packs SFT examples into rows of at most ``max_length`` tokens.

  Examples are taken in a seeded random order and appended to the current
  row while they fit (each example stays whole). Rows carry ``segment_ids``
  (1, 2, ...) so attention stays within each example and positions restart.
  """
  rows, current = [], None
  for i in np.random.default_rng(seed).permutation(len(examples)):
    e = examples[i]
    n = len(e["input_ids"])
    if current is None or len(current["input_ids"]) + n > max_length:
      current = {"input_ids": [], "loss_mask": [], "segment_ids": []}
      rows.append(current)
    segment = (current["segment_ids"][-1] + 1) if current["segment_ids"] else 1
    current["input_ids"] += list(e["input_ids"])
    current["loss_mask"] += list(e["loss_mask"])
    current["segment_ids"] += [segment] * n
  return rows


# --------------------------------------------------------------------------- #
# grain datasets
# --------------------------------------------------------------------------- #


def examples_dataset(examples_by_source, *, seed, mixture="concat",
                     weights=None):
  """One endless, shuffled grain MapDataset of examples.

  ``concat`` (count-based, as the paper mixes 30K + 30K): all sources in one
  pool, reshuffled every epoch. ``weighted``: each source repeats on its own
  and is sampled with ``weights``.
  """
  if mixture not in MIXTURES:
    raise DataError(f"mixture must be one of {MIXTURES}, got {mixture!r}")
  kept = [i for i, ex in enumerate(examples_by_source) if ex]
  sources = [grain.MapDataset.source(examples_by_source[i]) for i in kept]
  if not sources:
    raise DataError("no examples left after validation: see the data report")
  if mixture == "concat":
    return grain.MapDataset.concatenate(sources).seed(seed).shuffle().repeat()
  # An empty source (allowed by data.allow_empty_sources) takes its weight
  # along, so the others keep theirs.
  weights = [weights[i] for i in kept] if weights else [1.0] * len(sources)
  repeated = [s.seed(seed + i).shuffle().repeat() for i, s in enumerate(sources)]
  return grain.MapDataset.mix(repeated, weights)


def example_length(example) -> int:
  """Tokens of an example's longest row once collated."""
  if "input_ids" in example:
    return len(example["input_ids"])
  return max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def _collate_share(examples, *, collate, buckets, pad_id, process_index,
                   process_count):
  """This process's rows of one global batch, padded to the global bucket.

  Every process sees the whole global batch (the shared shuffled stream), so
  all of them pick the same padded length and compile the same program; a
  length chosen from the local rows alone differs between processes and
  breaks the collectives.
  """
  length = bucket_length(max(map(example_length, examples)), buckets)
  return collate(examples[process_index::process_count], buckets=(length,),
                 pad_id=pad_id)


def batches(examples_by_source, *, task, global_batch, seed=0,
            mixture="concat", weights=None, buckets=DEFAULT_BUCKETS, pad_id=0,
            process_index=0, process_count=1, layout="padded",
            pack_length=2048, pairs_per_row=8, rows_multiple=1):
  """An endless grain MapDataset of this process's batches.

  Each process takes every ``process_count``-th example of the shared shuffled
  stream, so processes see disjoint examples and together the global batch;
  all pad to the bucket of the global batch's longest row. With
  ``layout="packed"`` (preference pairs, see ``data.packing``) every process
  packs the whole global batch into rows of ``pack_length`` tokens (or of a
  bucket below it), at most ``pairs_per_row`` pairs each, a multiple of
  ``rows_multiple`` rows, and keeps its share of the rows: all agree on the
  row count and length as they do on the bucket.

  Returns:
    MapDataset whose element k is this process's share of global batch k
    (``global_batch // process_count`` rows, or its packed rows).
  """
  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} is not divisible by "
                    f"{process_count} processes")
  if layout not in packing.LAYOUTS:
    raise DataError(f"layout must be one of {packing.LAYOUTS}, got {layout!r}")
  collate = collate_sft if task == "sft" else collate_pairs
  ds = examples_dataset(examples_by_source, seed=seed, mixture=mixture,
                        weights=weights)
  if layout == "packed" and task != "sft":
    return ds.batch(global_batch, drop_remainder=True, batch_fn=functools.partial(
        packing.pack_share, length=pack_length, pairs_per_row=pairs_per_row,
        rows_multiple=rows_multiple, pad_id=pad_id, buckets=tuple(buckets),
        process_index=process_index, process_count=process_count))
  return ds.batch(global_batch, drop_remainder=True, batch_fn=functools.partial(
      _collate_share, collate=collate, buckets=buckets, pad_id=pad_id,
      process_index=process_index, process_count=process_count))


def with_buffer(main, buffer):
  """Adds ``buffer``'s k-th batch under key ``"buffer"`` of ``main``'s k-th."""
  return main.map_with_index(lambda k, b: dict(b, buffer=buffer[k]))
