"""Dataset adapters: rows of the paper's datasets -> canonical records.

Canonical records:

* preference: ``{"prompt": [messages], "chosen": str, "rejected": str,
  "chosen_is_safe": bool, "rejected_is_safe": bool}``, the chosen response
  being the more helpful one;
* sft: ``{"messages": [messages]}`` ending with an assistant turn.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}``.

A row that cannot become a record is skipped and counted by reason (see
:data:`SKIP_REASONS`); a source that cannot be read at all raises
:class:`DataError` with one line naming the file and the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os

import numpy as np

KINDS = ("ultrachat", "ultrafeedback", "pku_saferlhf", "redteam",
         "preference_jsonl", "sft_jsonl")
TASKS = ("preference", "sft")
ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("missing_field", "null_field", "bad_messages", "empty_prompt",
                "empty_response", "bad_safety_flag", "bad_response_index",
                "identical_responses", "no_pair", "no_room_for_response")
# Hub defaults: split of each dataset the paper uses.
DEFAULT_SPLITS = {"ultrachat": "train_sft", "ultrafeedback": "train_prefs",
                  "pku_saferlhf": "train"}
DEFAULT_TASKS = {"ultrachat": "sft", "sft_jsonl": "sft"}
REQUIRED = {
    ("ultrachat", "sft"): ("messages",),
    ("sft_jsonl", "sft"): ("messages",),
    ("ultrafeedback", "preference"): ("chosen", "rejected"),
    ("ultrafeedback", "sft"): ("chosen",),
    ("pku_saferlhf", "preference"): ("prompt", "response_0", "response_1",
                                     "better_response_id", "is_response_0_safe",
                                     "is_response_1_safe"),
    ("pku_saferlhf", "sft"): ("prompt", "response_0", "response_1",
                              "safer_response_id"),
    ("redteam", "preference"): ("prompt", "response", "is_safe"),
    ("preference_jsonl", "preference"): ("prompt", "chosen", "rejected",
                                         "chosen_is_safe", "rejected_is_safe"),
}


class DataError(ValueError):
  """A source that cannot be used at all (one line, names the file)."""


class Skip(Exception):  # noqa: N818 -- control flow, not an error
  """A row that is skipped; ``args[0]`` is one of SKIP_REASONS."""


@dataclasses.dataclass
class SourceSpec:
  """Where one source comes from and how much of it to use."""

  kind: str
  path: str  # local file/folder, or a hub dataset name
  task: str | None = None  # preference | sft; None: the kind's default
  split: str | None = None
  revision: str | None = None  # hub revision (commit/tag) to pin
  limit: int | None = None  # use at most this many records (seeded subset)
  weight: float = 1.0  # sampling weight in a weighted mixture
  name: str | None = None  # label in reports; default kind:path

  def __post_init__(self):
    if self.kind not in KINDS:
      raise DataError(f"{self.path}: unknown source kind {self.kind!r}; "
                      f"expected one of {', '.join(KINDS)}")
    self.task = self.task or DEFAULT_TASKS.get(self.kind, "preference")
    if (self.kind, self.task) not in REQUIRED:
      raise DataError(f"{self.path}: source kind {self.kind!r} cannot serve "
                      f"the {self.task!r} task")
    self.name = self.name or f"{self.kind}:{self.path}"

  @classmethod
  def parse(cls, text: str, **defaults) -> SourceSpec:
    """``KIND:PATH_OR_HUB_NAME``, as the data CLI takes it."""
    kind, sep, path = text.partition(":")
    if not sep or not path:
      raise DataError(f"--source {text!r}: expected KIND:PATH_OR_HUB_NAME")
    return cls(kind=kind, path=path, **defaults)


@dataclasses.dataclass
class SourceReport:
  """What happened to the rows of one source.

  ``rows_read = rows_kept + skips at validation``; a record whose prompt leaves
  no room for a response is counted as ``no_room_for_response`` when it is
  tokenized, and is missing from ``rows_used``.
  """

  name: str
  rows_read: int = 0
  rows_kept: int = 0  # rows that became (part of) a record
  records: int = 0  # records made (a red-team pair uses two rows)
  rows_used: int = 0  # records left after the limit and tokenization
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)

  def skip(self, reason: str):
    self.skipped[reason] += 1

  def as_dict(self):
    return {"rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "records": self.records, "rows_used": self.rows_used,
            "rows_skipped": dict(sorted(self.skipped.items()))}


# --------------------------------------------------------------------------- #
# Reading rows
# --------------------------------------------------------------------------- #


def _read_jsonl(path):
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line")
      rows.append(row)
  return rows


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})"
                      ) from None
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise DataError(f"{path}: expected a JSON list of objects")
  return data


def _read_parquet(path):
  import pyarrow.parquet as pq

  try:
    return pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for corrupt files
    raise DataError(f"{path}: not a readable parquet file ({e})") from None


_READERS = {".jsonl": _read_jsonl, ".json": _read_json,
            ".parquet": _read_parquet}


def _local_files(path, split):
  if os.path.isfile(path):
    return [path]
  files = sorted(f for ext in _READERS
                 for f in glob.glob(os.path.join(path, "**", f"*{ext}"),
                                    recursive=True))
  if split:
    matching = [f for f in files if split in os.path.basename(f)]
    files = matching or files
  if not files:
    raise DataError(f"{path}: no .jsonl, .json or .parquet files")
  return files


def read_rows(spec: SourceSpec) -> list[dict]:
  """Rows of a local file/folder, or of a hub dataset when online."""
  if os.path.exists(spec.path):
    rows = []
    for file in _local_files(spec.path, spec.split):
      ext = os.path.splitext(file)[1]
      if ext not in _READERS:
        raise DataError(f"{file}: unsupported file type {ext!r} "
                        "(use .jsonl, .json or .parquet)")
      rows.extend(_READERS[ext](file))
    return rows
  if spec.path.startswith((".", "/", "~")) or spec.path.endswith(
      tuple(_READERS)):
    raise DataError(f"{spec.path}: file does not exist")
  import datasets

  split = spec.split or DEFAULT_SPLITS.get(spec.kind, "train")
  try:
    ds = datasets.load_dataset(spec.path, split=split, revision=spec.revision)
  except Exception as e:  # network, missing dataset or split: one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"{spec.path}: cannot load split {split!r} from the hub "
                    f"({first})") from None
  return list(ds)


# --------------------------------------------------------------------------- #
# Rows -> canonical records
# --------------------------------------------------------------------------- #


def _field(row, key):
  if key not in row:
    raise Skip("missing_field")
  if row[key] is None:
    raise Skip("null_field")
  return row[key]


def _text(value, empty_reason):
  if not isinstance(value, str):
    raise Skip("bad_messages")
  if not value.strip():
    raise Skip(empty_reason)
  return value


def _flag(value):
  if not isinstance(value, bool | np.bool_):
    raise Skip("bad_safety_flag")
  return bool(value)


def _index(value):
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise Skip("bad_response_index")
  if value not in (0, 1):
    raise Skip("bad_response_index")
  return int(value)


def _messages(value, *, final_role=None):
  if not isinstance(value, list) or not value:
    raise Skip("bad_messages")
  out = []
  for m in value:
    if (not isinstance(m, dict) or m.get("role") not in ROLES
        or not isinstance(m.get("content"), str)):
      raise Skip("bad_messages")
    out.append({"role": m["role"], "content": m["content"]})
  if final_role and out[-1]["role"] != final_role:
    raise Skip("bad_messages")
  return out


def _prompt(value):
  """A prompt given as text or as a message list ending with a user turn."""
  if isinstance(value, str):
    return [{"role": "user", "content": _text(value, "empty_prompt")}]
  messages = _messages(value, final_role="user")
  if not any(m["content"].strip() for m in messages):
    raise Skip("empty_prompt")
  return messages


def _response(value):
  """A response given as text or as a message list ending with it."""
  if isinstance(value, list):
    value = _messages(value, final_role="assistant")[-1]["content"]
  return _text(value, "empty_response")


def _pair(prompt, chosen, rejected, chosen_is_safe, rejected_is_safe):
  if chosen == rejected:
    raise Skip("identical_responses")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
          "chosen_is_safe": chosen_is_safe, "rejected_is_safe": rejected_is_safe}


def _sft(messages):
  if not any(m["role"] == "user" and m["content"].strip() for m in messages):
    raise Skip("empty_prompt")
  if not messages[-1]["content"].strip():
    raise Skip("empty_response")
  return {"messages": messages}


def _ultrafeedback_prompt(chosen_messages, row):
  if len(chosen_messages) > 1:
    return _prompt(chosen_messages[:-1])
  return _prompt(_field(row, "prompt"))


def to_record(kind: str, task: str, row: dict) -> dict:
  """One row -> one canonical record; raises :class:`Skip` with a reason."""
  if kind in ("ultrachat", "sft_jsonl"):
    return _sft(_messages(_field(row, "messages"), final_role="assistant"))
  if kind == "ultrafeedback":
    chosen_msgs = _messages(_field(row, "chosen"), final_role="assistant")
    prompt = _ultrafeedback_prompt(chosen_msgs, row)
    chosen = _response(chosen_msgs)
    if task == "sft":
      return _sft(prompt + [{"role": "assistant", "content": chosen}])
    rejected = _response(_field(row, "rejected"))
    return _pair(prompt, chosen, rejected, True, True)
  if kind == "pku_saferlhf":
    prompt = _prompt(_field(row, "prompt"))
    responses = [_response(_field(row, f"response_{i}")) for i in (0, 1)]
    if task == "sft":
      target = responses[_index(_field(row, "safer_response_id"))]
      return _sft(prompt + [{"role": "assistant", "content": target}])
    better = _index(_field(row, "better_response_id"))
    safe = [_flag(_field(row, f"is_response_{i}_safe")) for i in (0, 1)]
    return _pair(prompt, responses[better], responses[1 - better], safe[better],
                 safe[1 - better])
  if kind == "preference_jsonl":
    return _pair(_prompt(_field(row, "prompt")),
                 _response(_field(row, "chosen")),
                 _response(_field(row, "rejected")),
                 _flag(_field(row, "chosen_is_safe")),
                 _flag(_field(row, "rejected_is_safe")))
  raise DataError(f"no row adapter for kind {kind!r}")


def _redteam_records(rows, report):
  """Red-team rows (prompt, response, is_safe) -> safe-over-unsafe pairs.

  Responses to the same prompt are paired: each unsafe response is the
  rejected side of a pair whose chosen side is a safe response to that prompt
  (flags (True, False)). Rows with no counterpart are skipped as ``no_pair``.
  """
  by_prompt = collections.OrderedDict()
  for row in rows:
    try:
      prompt = _prompt(_field(row, "prompt"))
      response = _response(_field(row, "response"))
      safe = _flag(_field(row, "is_safe"))
    except Skip as s:
      report.skip(s.args[0])
      continue
    key = json.dumps(prompt, sort_keys=True)
    by_prompt.setdefault(key, (prompt, [], []))[1 if safe else 2].append(response)
  records = []
  for prompt, safe, unsafe in by_prompt.values():
    if not safe or not unsafe:
      for _ in safe + unsafe:
        report.skip("no_pair")
      continue
    for i, bad in enumerate(unsafe):
      good = safe[i % len(safe)]
      if good == bad:
        report.skip("identical_responses")
        continue
      records.append(_pair(prompt, good, bad, True, False))
    for _ in range(len(safe) - min(len(safe), len(unsafe))):
      report.skip("no_pair")
  return records


def load_records(spec: SourceSpec, seed: int = 0):
  """Reads, validates and (with ``limit``) subsamples one source.

  Returns:
    ``(records, report)``. The subsample is a seeded random choice of
    ``limit`` kept records, in their original order.
  """
  rows = read_rows(spec)
  report = SourceReport(spec.name, rows_read=len(rows))
  if rows:
    present = set().union(*(r.keys() for r in rows))
    missing = [c for c in REQUIRED[(spec.kind, spec.task)] if c not in present]
    if missing:
      raise DataError(f"{spec.path}: required column(s) {', '.join(missing)} "
                      f"missing for kind {spec.kind!r}")
  if spec.kind == "redteam":
    records = _redteam_records(rows, report)
  else:
    records = []
    for row in rows:
      try:
        records.append(to_record(spec.kind, spec.task, row))
      except Skip as s:
        report.skip(s.args[0])
  report.records = len(records)
  report.rows_kept = report.rows_read - sum(report.skipped.values())
  if spec.limit is not None and spec.limit < len(records):
    chosen = np.sort(np.random.default_rng(seed).choice(
        len(records), spec.limit, replace=False))
    records = [records[i] for i in chosen]
  report.rows_used = len(records)
  return records, report
