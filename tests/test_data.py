"""Data pipeline: real-schema fixtures, subsets, bad input, reports, grain."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bfpo_jax.data import pipeline
from bfpo_jax.data.__main__ import main as data_cli
from bfpo_jax.data.sources import DataError, SourceSpec, load_records, to_record
from bfpo_jax.model.tokenizer import load_tokenizer

TINY = os.path.join(os.path.dirname(pipeline.__file__), "tiny")
FILES = {"ultrachat": "ultrachat_200k.jsonl",
         "ultrafeedback": "ultrafeedback_binarized.jsonl",
         "pku_saferlhf": "pku_saferlhf.jsonl", "redteam": "redteam.json",
         "redteam_responses": "redteam_responses.json"}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _spec(kind, name, **kw):
  return SourceSpec(kind, os.path.join(TINY, FILES[name]), **kw)


# ------------------------------------------------------------------ sources


def test_fixtures_in_real_schemas_load_completely():
  for kind in ("ultrachat", "ultrafeedback", "pku_saferlhf"):
    records, report = load_records(_spec(kind, kind))
    assert report.rows_read == report.rows_kept == len(records) == 48, kind
    assert not report.skipped
  records, report = load_records(_spec("redteam", "redteam"))
  assert report.rows_read == report.records == len(records) == 24
  groups = {(r["chosen_is_safe"], r["rejected_is_safe"]) for r in records}
  assert len(groups) == 4
  records, report = load_records(_spec("redteam_responses",
                                       "redteam_responses"))
  assert report.rows_read == 32 and report.records == len(records) == 16
  assert all(r["chosen_is_safe"] and not r["rejected_is_safe"] for r in records)


def test_pku_pairs_follow_better_id_and_sft_takes_safer():
  row = {"prompt": "Q?", "response_0": "unsafe but useful",
         "response_1": "safe refusal", "is_response_0_safe": False,
         "is_response_1_safe": True, "better_response_id": 0,
         "safer_response_id": 1}
  pair = to_record("pku_saferlhf", "preference", row)
  assert pair == {"prompt": [{"role": "user", "content": "Q?"}],
                  "chosen": "unsafe but useful", "rejected": "safe refusal",
                  "chosen_is_safe": False, "rejected_is_safe": True}
  sft = to_record("pku_saferlhf", "sft", row)
  assert sft["messages"][-1] == {"role": "assistant", "content": "safe refusal"}


def test_ultrafeedback_prompt_is_the_message_history():
  row = {"prompt": "ignored when chosen has the history",
         "chosen": [{"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "bad"}]}
  rec = to_record("ultrafeedback", "preference", row)
  assert [m["content"] for m in rec["prompt"]] == ["a", "b", "c"]
  assert (rec["chosen"], rec["rejected"]) == ("good", "bad")
  assert rec["chosen_is_safe"] and rec["rejected_is_safe"]


def _redteam_row(better, safe1, safe2, **change):
  row = {"prompt": "How do I pick a lock?", "modeloutput1": "output one",
         "modeloutput2": "output two", "better_modelout": better,
         "is_modelout1_safe": safe1, "is_modelout2_safe": safe2}
  return dict(row, **change)


def test_redteam_rows_in_the_reference_schema(tmp_path):
  rows = [_redteam_row(1, True, True), _redteam_row(2, True, False),
          _redteam_row(1, True, False), _redteam_row("2", False, False),
          _redteam_row(2, 0, 1),  # 0/1 flags, read as the reference does
          _redteam_row(3, True, True),  # no third output
          _redteam_row(1, "yes", True)]
  path = tmp_path / "redteam.json"
  path.write_text(json.dumps(rows))
  records, report = load_records(SourceSpec("redteam", str(path)))
  chosen = [(r["chosen"], r["chosen_is_safe"], r["rejected"],
             r["rejected_is_safe"]) for r in records]
  one, two = "output one", "output two"
  assert chosen == [(one, True, two, True), (two, False, one, True),
                    (one, True, two, False), (two, False, one, False),
                    (two, True, one, False)]
  # All four (chosen_is_safe, rejected_is_safe) groups occur.
  assert {(c[1], c[3]) for c in chosen} == {(True, True), (True, False),
                                            (False, True), (False, False)}
  assert dict(report.skipped) == {"bad_response_index": 1,
                                  "bad_safety_flag": 1}
  lines = tmp_path / "redteam_lines.json"  # JSON lines in a .json file
  lines.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
  assert len(load_records(SourceSpec("redteam", str(lines)))[0]) == 2


def test_source_options_and_their_errors():
  spec = SourceSpec.parse("pku_saferlhf:PKU-Alignment/PKU-SafeRLHF?revision=abc"
                          "&take=0.2&split=test", revision="run-wide", limit=7)
  assert (spec.kind, spec.path, spec.revision, spec.take, spec.split,
          spec.limit) == ("pku_saferlhf", "PKU-Alignment/PKU-SafeRLHF", "abc",
                          0.2, "test", 7)
  assert SourceSpec.parse("ultrachat:x", revision="r").revision == "r"
  assert SourceSpec.parse("ultrachat:x?take=30000").take == 30000
  for bad, message in (("ultrachat:x?size=3", "not one of revision"),
                       ("ultrachat:x?take=1.5", r"fraction must be in \(0, 1\]"),
                       ("ultrachat:x?take=0", "count must be >= 1"),
                       ("ultrachat:x?take=most", "expected a fraction"),
                       ("ultrachat", "expected KIND:PATH")):
    with pytest.raises(DataError, match=message):
      SourceSpec.parse(bad)


@pytest.mark.parametrize("take", [0.3, 0.999, 1.0, 5, 1000])
def test_take_is_the_first_rows_shuffled_as_datasets_does(tmp_path, take):
  import datasets

  rows = [dict(GOOD, prompt=f"question {i}") for i in range(23)]
  path = _write_jsonl(tmp_path / "p.jsonl", rows)
  records, report = load_records(SourceSpec.parse(
      f"preference_jsonl:{path}?take={take}"))
  # The reference: select(range(int(frac * len))) then shuffle(seed=42).
  n = int(take * len(rows)) if isinstance(take, float) else min(take, 23)
  expected = datasets.Dataset.from_list(rows).select(range(n)).shuffle(seed=42)
  assert [r["prompt"][0]["content"] for r in records] == expected["prompt"]
  assert (report.rows_total, report.rows_read) == (23, n)


def test_each_source_pins_its_own_revision(monkeypatch):
  import datasets

  calls = []

  def fake_load_dataset(path, split=None, revision=None):
    calls.append((path, split, revision))
    return [GOOD]

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  for text in ("preference_jsonl:org/pairs?revision=abc123&split=test",
               "preference_jsonl:org/other"):
    load_records(SourceSpec.parse(text, revision="run-wide"))
  assert calls == [("org/pairs", "test", "abc123"),
                   ("org/other", "train", "run-wide")]


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_is_safe": True,
        "rejected_is_safe": False}


@pytest.mark.parametrize("change,reason", [
    ({"chosen": None}, "null_field"),
    ({"prompt": "  "}, "empty_prompt"),
    ({"rejected": ""}, "empty_response"),
    ({"chosen_is_safe": 1}, "bad_safety_flag"),
    ({"rejected_is_safe": "false"}, "bad_safety_flag"),
    ({"rejected": "a"}, "identical_responses"),
    ({"prompt": [{"role": "robot", "content": "x"}]}, "bad_messages"),
])
def test_bad_rows_are_skipped_and_counted(tmp_path, change, reason):
  rows = [GOOD, dict(GOOD, **change), GOOD]
  records, report = load_records(SourceSpec(
      "preference_jsonl", _write_jsonl(tmp_path / "p.jsonl", rows)))
  assert len(records) == 2 and report.rows_read == 3
  assert dict(report.skipped) == {reason: 1}


def test_missing_field_and_bad_index(tmp_path):
  rows = [GOOD, {k: v for k, v in GOOD.items() if k != "rejected"}]
  _, report = load_records(SourceSpec("preference_jsonl",
                                      _write_jsonl(tmp_path / "m.jsonl", rows)))
  assert dict(report.skipped) == {"missing_field": 1}
  pku = json.loads(open(os.path.join(TINY, FILES["pku_saferlhf"])).readline())
  bad = [pku, dict(pku, better_response_id=2), dict(pku, better_response_id=True)]
  _, report = load_records(SourceSpec("pku_saferlhf",
                                      _write_jsonl(tmp_path / "k.jsonl", bad)))
  assert dict(report.skipped) == {"bad_response_index": 2}


def test_unreadable_sources_stop_with_one_line(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: file does not exist"):
    load_records(SourceSpec("sft_jsonl", str(tmp_path / "nope.jsonl")))
  broken = tmp_path / "broken.jsonl"
  broken.write_text(json.dumps(GOOD) + "\n{not json\n")
  with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
    load_records(SourceSpec("preference_jsonl", str(broken)))
  cols = _write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "p", "chosen": "c"}])
  with pytest.raises(DataError, match="required column.*rejected"):
    load_records(SourceSpec("preference_jsonl", cols))
  with pytest.raises(DataError, match="unknown source kind"):
    SourceSpec.parse("nonsense:x")


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.data", "--source",
       f"preference_jsonl:{tmp_path}/missing.jsonl"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/missing.jsonl: file does not exist")


def test_cli_report(tmp_path, capsys):
  bad = _write_jsonl(tmp_path / "pairs.jsonl",
                     [GOOD, dict(GOOD, chosen_is_safe=None), GOOD])
  out = tmp_path / "report.json"
  rc = data_cli(["--source", f"preference_jsonl:{bad}", "--source",
                 f"ultrachat:{os.path.join(TINY, FILES['ultrachat'])}",
                 "--report", str(out)])
  assert rc == 0
  report = json.loads(out.read_text())
  entry = report[f"preference_jsonl:{bad}"]
  assert (entry["rows_read"], entry["rows_kept"], entry["rows_used"]) == (3, 2, 2)
  assert entry["rows_skipped"] == {"null_field": 1}
  assert entry["token_lengths"]["chosen"]["max"] > 0
  uc = report[f"ultrachat:{os.path.join(TINY, FILES['ultrachat'])}"]
  assert uc["rows_used"] == 48 and uc["token_lengths"]["sequence"]["p95"] > 0
  assert "null_field=1" in capsys.readouterr().out


def test_cli_dump_writes_what_the_model_sees(tmp_path, tok):
  from bfpo_jax.data.tokenize import ChatTokenizer, tokenize_pair, tokenize_sft

  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
      dict(GOOD, prompt="p " * 60, chosen="long " * 80, rejected="b"), GOOD])
  chats = os.path.join(TINY, FILES["ultrachat"])
  out = tmp_path / "dump.jsonl"
  assert data_cli(["--source", f"preference_jsonl:{pairs}", "--source",
                   f"ultrachat:{chats}?take=2", "--dump", str(out),
                   "--max_length", "64", "--max_prompt_length", "24"]) == 0
  dumped = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(dumped) == 4
  records, _ = load_records(SourceSpec("preference_jsonl", pairs))
  chat = ChatTokenizer(tok)
  for row, record in zip(dumped, records):
    ex = tokenize_pair(chat, record, max_prompt_length=24, max_length=64)
    n = ex["prompt_length"]
    assert row == {
        "prompt_input_ids": ex["chosen_ids"][:n],
        "chosen_input_ids": ex["chosen_ids"][n:],
        "rejected_input_ids": ex["rejected_ids"][n:],
        "chosen_labels_mask": [1] * (len(ex["chosen_ids"]) - n),
        "rejected_labels_mask": [1] * (len(ex["rejected_ids"]) - n),
        "chosen_is_safe": True, "rejected_is_safe": False}
  # The long pair was cut as trl cuts it: prompt 24, responses 64 - 24.
  assert len(dumped[0]["prompt_input_ids"]) == 24
  assert len(dumped[0]["chosen_input_ids"]) == 40
  sft, _ = load_records(SourceSpec.parse(f"ultrachat:{chats}?take=2"))
  for row, record in zip(dumped[2:], sft):
    ex = tokenize_sft(chat, record, max_length=64)
    assert row == {"input_ids": ex["input_ids"],
                   "loss_mask": [int(m) for m in ex["loss_mask"]]}


# ------------------------------------------------------------------- grain


@pytest.fixture(scope="module")
def pref_examples(tok):
  specs = [_spec("ultrafeedback", "ultrafeedback"),
           _spec("pku_saferlhf", "pku_saferlhf")]
  examples, _ = pipeline.prepare(specs, tok, task="preference",
                                 max_prompt_length=64, max_length=128)
  return examples


def _take(ds, n, start=0):
  it = iter(ds.to_iter_dataset())
  if start:
    for _ in range(start):
      next(it)
  return [next(it) for _ in range(n)]


def test_batches_match_the_step_layout(pref_examples):
  ds = pipeline.batches(pref_examples, task="preference", global_batch=8,
                        buckets=(64, 128), pad_id=0)
  batch = ds[0]
  assert batch["chosen_input_ids"].shape[0] == 8
  assert batch["chosen_input_ids"].shape[1] in (64, 128)
  for side in ("chosen", "rejected"):
    ids, att, loss = (batch[f"{side}_{k}"] for k in
                      ("input_ids", "attention_mask", "loss_mask"))
    assert not (loss & ~att).any() and (ids[~att] == 0).all()
    assert (ids[:, 0] == 1).all()
  assert batch["chosen_is_safe"].dtype == bool


def test_deterministic_and_resumes_at_the_next_batch(pref_examples):
  make = lambda seed: pipeline.batches(  # noqa: E731
      pref_examples, task="preference", global_batch=4, seed=seed)
  a, b = _take(make(0), 6), _take(make(0), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["chosen_input_ids"], y["chosen_input_ids"])
  c = _take(make(1), 1)[0]
  assert not np.array_equal(a[0]["chosen_input_ids"], c["chosen_input_ids"])
  it = iter(make(0).to_iter_dataset())
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = iter(make(0).to_iter_dataset())
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["chosen_input_ids"],
                                a[3]["chosen_input_ids"])


def test_process_shards_cover_each_example_once():
  n, processes = 24, 3
  examples = [[{"id": i} for i in range(n)]]
  stream = pipeline.examples_dataset(examples, seed=5)
  seen = []
  for p in range(processes):
    shard = stream[p::processes]
    seen += [shard[k]["id"] for k in range(n // processes)]
  assert sorted(seen) == list(range(n))


def test_weighted_mixture_follows_weights():
  a = [{"src": 0}] * 10
  b = [{"src": 1}] * 10
  ds = pipeline.examples_dataset([a, b], seed=0, mixture="weighted",
                                 weights=[3.0, 1.0])
  share = np.mean([ds[k]["src"] for k in range(400)])
  assert 0.2 <= share <= 0.3


def test_buffer_stream_rides_along(tok, pref_examples):
  sft, _ = pipeline.prepare([_spec("ultrachat", "ultrachat")], tok, task="sft",
                            max_length=128)
  main = pipeline.batches(pref_examples, task="preference", global_batch=4)
  buffer = pipeline.batches(sft, task="sft", global_batch=2)
  batch = pipeline.with_buffer(main, buffer)[3]
  np.testing.assert_array_equal(batch["buffer"]["input_ids"],
                                buffer[3]["input_ids"])
  assert batch["chosen_input_ids"].shape[0] == 4


def test_pack_stream_is_trls_constant_length_packing():
  examples = [[{"input_ids": [10 * k + i for i in range(n)],
                "loss_mask": [False] + [True] * (n - 1)}
               for k, n in enumerate((5, 7, 3, 9))],
              [{"input_ids": [100 + i for i in range(6)],
                "loss_mask": [True] * 6}]]
  rows = pipeline.pack_stream(examples, 8, seed=3)
  flat = [e for source in examples for e in source]
  order = np.random.default_rng(3).permutation(len(flat))
  stream = [t for i in order for t in flat[i]["input_ids"]]
  assert [r["input_ids"] for r in rows] == [stream[:8], stream[8:16],
                                            stream[16:24]]  # 30 tokens: 6 dropped
  assert all(r["loss_mask"] == [True] * 8 for r in rows)
  batch = pipeline.collate_sft(rows, buckets=(8,), pad_id=0)
  assert "segment_ids" not in batch and batch["attention_mask"].all()


def test_preference_buffer_stream_has_its_own_pairs(pref_examples):
  safety, helpful = pref_examples[1], pref_examples[0]
  main = pipeline.batches([safety], task="preference", global_batch=4)
  buffer = pipeline.batches([helpful], task="preference", global_batch=4,
                            seed=1)
  batch = pipeline.with_buffer(main, buffer)[2]
  assert batch["buffer"]["chosen_input_ids"].shape[0] == 4
  np.testing.assert_array_equal(batch["buffer"]["chosen_input_ids"],
                                buffer[2]["chosen_input_ids"])
  assert batch["buffer"]["chosen_is_safe"].all()  # UltraFeedback: both safe


def test_pack_sft_keeps_every_example_once(tok):
  examples, _ = pipeline.prepare([_spec("ultrachat", "ultrachat")], tok,
                                 task="sft", max_length=256)
  rows = pipeline.pack_sft(examples[0], 256, seed=0)
  assert len(rows) < len(examples[0])
  assert all(len(r["input_ids"]) <= 256 for r in rows)
  pieces = []
  for r in rows:
    seg = np.asarray(r["segment_ids"])
    assert seg[0] == 1 and (np.diff(seg) >= 0).all()
    ids = np.asarray(r["input_ids"])
    pieces += [tuple(ids[seg == s]) for s in np.unique(seg)]
  assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples[0])
  batch = pipeline.collate_sft(rows[:2], buckets=(256,), pad_id=0)
  np.testing.assert_array_equal(batch["attention_mask"],
                                batch["segment_ids"] > 0)


def test_worker_processes_tokenize_identically(tmp_path, tok):
  rows = [dict(GOOD, prompt=f"question {i}?", chosen=f"answer {i}",
               rejected=f"no {i}") for i in range(2100)]
  rows[7]["chosen_is_safe"] = "yes"  # one bad row, counted either way
  spec = SourceSpec("preference_jsonl", _write_jsonl(tmp_path / "big.jsonl", rows))
  serial, r0 = pipeline.prepare([spec], tok, task="preference")
  parallel, r2 = pipeline.prepare([spec], tok, task="preference", num_workers=2)
  assert serial == parallel and len(serial[0]) == 2099
  assert r0 == r2
