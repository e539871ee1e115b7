"""Dataset adapters: rows of the paper's datasets -> canonical records.

Canonical records:

* preference: ``{"prompt": [messages], "chosen": str, "rejected": str,
  "chosen_is_safe": bool, "rejected_is_safe": bool}``, the chosen response
  being the more helpful one (a PKU-SafeRLHF source with ``?chosen=safer``:
  the safer one, as SACPO's safety stage reads it);
* sft: ``{"messages": [messages]}`` ending with an assistant turn.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}``.

A row that cannot become a record is skipped and counted by reason (see
:data:`SKIP_REASONS`); a source that cannot be read at all raises
:class:`DataError` with one line naming the file and the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np

from bfpo_jax.data.readers import DataError, read_rows

KINDS = ("ultrachat", "ultrafeedback", "pku_saferlhf", "redteam",
         "redteam_responses", "preference_jsonl", "sft_jsonl")
TASKS = ("preference", "sft")
ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("missing_field", "null_field", "bad_messages", "empty_prompt",
                "empty_response", "bad_safety_flag", "bad_response_index",
                "identical_responses", "no_pair", "no_room_for_response",
                "prompt_merges_with_response", "special_token_in_text")
# What the skips above mean for a user comparing against the reference.
FILTER_NOTE = ("rows skipped here are this port's filters (malformed or empty "
               "fields, identical responses); the reference trainer keeps such "
               "rows")
# The reference's row order after its subset: datasets' shuffle(seed=42).
TAKE_SHUFFLE_SEED = 42
SPEC_OPTIONS = ("revision", "split", "take", "chosen")
# Which response of a PKU-SafeRLHF pair is the chosen side: the more helpful
# (``better_response_id``, BFPO's and SACPO's helpfulness stage) or the safer
# (``safer_response_id``, SACPO's safety stage: line/sacpo src/util.py
# get_pku_pair_by_safety).
CHOSEN = ("better", "safer")
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
    ("redteam", "preference"): ("prompt", "modeloutput1", "modeloutput2",
                                "better_modelout", "is_modelout1_safe",
                                "is_modelout2_safe"),
    ("redteam_responses", "preference"): ("prompt", "response", "is_safe"),
    ("preference_jsonl", "preference"): ("prompt", "chosen", "rejected",
                                         "chosen_is_safe", "rejected_is_safe"),
}


class Skip(Exception):  # noqa: N818 -- control flow, not an error
  """A row that is skipped; ``args[0]`` is one of SKIP_REASONS."""


def parse_take(value) -> float | int | None:
  """``take``: a fraction in (0, 1] (``0.2``) or a count >= 1 (``30000``)."""
  if value is None or isinstance(value, int | float) and not isinstance(
      value, bool):
    number = value
  else:
    text = str(value).strip()
    try:
      number = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
      raise DataError(f"take={value!r}: expected a fraction like 0.2 or a "
                      "count like 30000") from None
  if number is None:
    return None
  if isinstance(number, float) and not 0.0 < number <= 1.0:
    raise DataError(f"take={value!r}: a fraction must be in (0, 1]")
  if isinstance(number, int) and number < 1:
    raise DataError(f"take={value!r}: a count must be >= 1")
  return number


@dataclasses.dataclass
class SourceSpec:
  """Where one source comes from and how much of it to use."""

  kind: str
  path: str  # local file/folder, or a hub dataset name
  task: str | None = None  # preference | sft; None: the kind's default
  split: str | None = None
  revision: str | None = None  # hub revision (commit/tag) to pin
  take: float | int | None = None  # the first fraction/count of the rows
  limit: int | None = None  # use at most this many records (seeded subset)
  chosen: str = "better"  # pku_saferlhf pairs: better | safer (CHOSEN)
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
    self.take = parse_take(self.take)
    if self.chosen not in CHOSEN:
      raise DataError(f"{self.path}: chosen={self.chosen!r} is not one of "
                      f"{', '.join(CHOSEN)}")
    if self.chosen != "better" and (self.kind, self.task) != (
        "pku_saferlhf", "preference"):
      raise DataError(f"{self.path}: chosen={self.chosen} needs a "
                      "pku_saferlhf preference source (its safer_response_id)")
    self.name = self.name or f"{self.kind}:{self.path}"

  @classmethod
  def parse(cls, text: str, **defaults) -> SourceSpec:
    """``KIND:PATH_OR_HUB_NAME[?revision=R&split=S&take=T&chosen=C]``.

    Options after ``?`` are this source's own and win over ``defaults``
    (e.g. a run-wide revision); ``take`` is a fraction (``0.2``) or a count;
    ``chosen`` is ``better`` or ``safer`` (:data:`CHOSEN`).
    The report names the source by the whole text.
    """
    kind, sep, rest = text.partition(":")
    path, _, query = rest.partition("?")
    if not sep or not path:
      raise DataError(f"source {text!r}: expected KIND:PATH_OR_HUB_NAME")
    options = {}
    for item in filter(None, query.split("&")):
      key, eq, value = item.partition("=")
      if key not in SPEC_OPTIONS or not eq or not value:
        raise DataError(f"source {text!r}: option {item!r} is not one of "
                        f"{', '.join(o + '=VALUE' for o in SPEC_OPTIONS)}")
      options[key] = value
    return cls(kind=kind, path=path, **{**defaults, **options,
                                         "name": defaults.get("name") or text})


@dataclasses.dataclass
class SourceReport:
  """What happened to the rows of one source.

  ``rows_read = rows_kept + skips at validation``; a record whose prompt leaves
  no room for a response is counted as ``no_room_for_response`` when it is
  tokenized, and is missing from ``rows_used``.
  """

  name: str
  rows_total: int = 0  # rows in the split, before ``take``
  rows_read: int = 0
  rows_kept: int = 0  # rows that became (part of) a record
  records: int = 0  # records made (a red-team pair uses two rows)
  rows_used: int = 0  # records left after the limit and tokenization
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)

  def skip(self, reason: str):
    self.skipped[reason] += 1

  def as_dict(self):
    return {"rows_total": self.rows_total, "rows_read": self.rows_read,
            "rows_kept": self.rows_kept, "records": self.records,
            "rows_used": self.rows_used,
            "rows_skipped": dict(sorted(self.skipped.items())),
            "filters": FILTER_NOTE}


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


def _index(value, valid=(0, 1)):
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)  # the reference reads red-team ids with int()
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise Skip("bad_response_index")
  if value not in valid:
    raise Skip("bad_response_index")
  return int(value)


def _truthy_flag(value):
  """A red-team safety flag: bool, or 0/1 (the reference reads it as truthy)."""
  if isinstance(value, int | np.integer) and value in (0, 1):
    return bool(value)
  return _flag(value)


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


def required_columns(spec: SourceSpec) -> tuple[str, ...]:
  """The columns a source's rows must have (:data:`REQUIRED`, with
  ``safer_response_id`` for ``chosen=safer``)."""
  columns = REQUIRED[(spec.kind, spec.task)]
  if spec.chosen == "safer":
    columns = tuple("safer_response_id" if c == "better_response_id" else c
                    for c in columns)
  return columns


def to_record(kind: str, task: str, row: dict,
              chosen_side: str = "better") -> dict:
  """One row -> one canonical record; raises :class:`Skip` with a reason.

  ``chosen_side="safer"`` (pku_saferlhf preference rows only) puts the safer
  response on the chosen side; each response keeps its own safety flag.
  """
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
    better = _index(_field(row, f"{chosen_side}_response_id"))
    safe = [_flag(_field(row, f"is_response_{i}_safe")) for i in (0, 1)]
    return _pair(prompt, responses[better], responses[1 - better], safe[better],
                 safe[1 - better])
  if kind == "redteam":  # the reference's zephyr-7b-beta_beaver_redteaming.json
    prompt = _prompt(_field(row, "prompt"))
    better = _index(_field(row, "better_modelout"), valid=(1, 2))
    outputs = {i: _response(_field(row, f"modeloutput{i}")) for i in (1, 2)}
    safe = {i: _truthy_flag(_field(row, f"is_modelout{i}_safe")) for i in (1, 2)}
    return _pair(prompt, outputs[better], outputs[3 - better], safe[better],
                 safe[3 - better])
  if kind == "preference_jsonl":
    return _pair(_prompt(_field(row, "prompt")),
                 _response(_field(row, "chosen")),
                 _response(_field(row, "rejected")),
                 _flag(_field(row, "chosen_is_safe")),
                 _flag(_field(row, "rejected_is_safe")))
  raise DataError(f"no row adapter for kind {kind!r}")


def _response_records(rows, report):
  """Single-response rows (prompt, response, is_safe) -> safe-over-unsafe
  pairs (kind ``redteam_responses``).

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


def take_rows(rows, take):
  """The reference's subset: the first ``take`` rows (a fraction is floored,
  ``select(range(int(frac * len)))``), shuffled as datasets'
  ``shuffle(seed=42)`` shuffles them."""
  if take is None:
    return rows
  n = int(take * len(rows)) if isinstance(take, float) else min(take, len(rows))
  order = np.random.default_rng(TAKE_SHUFFLE_SEED).permutation(n)
  return [rows[i] for i in order]


def load_records(spec: SourceSpec, seed: int = 0):
  """Reads, validates and subsamples one source.

  ``take`` keeps the reference's subset (:func:`take_rows`) before
  validation; ``limit`` then draws a seeded random choice of that many kept
  records, in their order.

  Returns:
    ``(records, report)``.
  """
  rows = read_rows(spec)
  rows_total = len(rows)
  rows = take_rows(rows, spec.take)
  report = SourceReport(spec.name, rows_total=rows_total, rows_read=len(rows))
  if rows:
    present = set().union(*(r.keys() for r in rows))
    missing = [c for c in required_columns(spec) if c not in present]
    if missing:
      raise DataError(f"{spec.path}: required column(s) {', '.join(missing)} "
                      f"missing for kind {spec.kind!r}")
  if spec.kind == "redteam_responses":
    records = _response_records(rows, report)
  else:
    records = []
    for row in rows:
      try:
        records.append(to_record(spec.kind, spec.task, row, spec.chosen))
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
