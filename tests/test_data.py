"""Data pipeline: real-schema fixtures, exact token layouts, bad input, grain."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bfpo_jax.data import pipeline
from bfpo_jax.data.__main__ import main as data_cli
from bfpo_jax.data.sources import DataError, SourceSpec, load_records, to_record
from bfpo_jax.data.tokenize import ChatTokenizer, tokenize_pair, tokenize_sft
from bfpo_jax.model.tokenizer import load_tokenizer

TINY = os.path.join(os.path.dirname(pipeline.__file__), "tiny")
FILES = {"ultrachat": "ultrachat_200k.jsonl",
         "ultrafeedback": "ultrafeedback_binarized.jsonl",
         "pku_saferlhf": "pku_saferlhf.jsonl", "redteam": "redteam.json"}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
  return ChatTokenizer(tok)


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


# ------------------------------------------------------------- tokenization


def test_pair_layout_equals_whole_text_zephyr_tokenization(tok, chat):
  record = {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Name a prime."}],
            "chosen": "Seven.", "rejected": "Nine is prime.",
            "chosen_is_safe": True, "rejected_is_safe": True}
  ex = tokenize_pair(chat, record, max_prompt_length=512, max_length=1024)
  prompt_text = ("<|system|>\nBe brief.</s>\n<|user|>\nName a prime.</s>\n"
                 "<|assistant|>\n")
  for side, response in (("chosen", "Seven."), ("rejected", "Nine is prime.")):
    whole = [1] + tok(prompt_text + response + "</s>",
                      add_special_tokens=False).input_ids
    assert ex[f"{side}_ids"] == whole
  prompt_ids = [1] + tok(prompt_text, add_special_tokens=False).input_ids
  assert ex["prompt_length"] == len(prompt_ids)
  assert ex["chosen_ids"][: ex["prompt_length"]] == prompt_ids
  assert ex["chosen_ids"][0] == tok.bos_token_id
  assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tok.eos_token_id


def test_user_text_cannot_inject_special_tokens(chat):
  record = {"prompt": [{"role": "user", "content": "say </s> please"}],
            "chosen": "ok </s> done",
            "rejected": "no", "chosen_is_safe": True, "rejected_is_safe": True}
  ex = tokenize_pair(chat, record)
  eos_positions = [i for i, t in enumerate(ex["chosen_ids"]) if t == chat.eos_id]
  # Exactly two EOS: after the user turn and at the very end.
  assert len(eos_positions) == 2 and eos_positions[-1] == len(ex["chosen_ids"]) - 1


def test_truncation_keeps_bos_and_prompt_end(chat):
  long_prompt = " ".join(f"word{i}" for i in range(200))
  user = [{"role": "user", "content": long_prompt}]
  record = dict(GOOD, prompt=user, chosen="x " * 100)
  full = chat.encode_prompt([{"role": "user", "content": long_prompt}])
  ex = tokenize_pair(chat, record, max_prompt_length=32, max_length=48)
  assert ex["prompt_length"] == 32
  assert ex["chosen_ids"][0] == chat.bos_id
  assert ex["chosen_ids"][1:32] == full[-31:]
  assert len(ex["chosen_ids"]) == 48  # response cut on the right
  with pytest.raises(Exception, match="no_room_for_response"):
    tokenize_pair(chat, dict(GOOD, prompt=user), max_prompt_length=64,
                  max_length=64)


def test_sft_mask_covers_assistant_turns_only(tok, chat):
  msgs = [{"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Bye"},
          {"role": "assistant", "content": "See you."}]
  ex = tokenize_sft(chat, {"messages": msgs})
  text = "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n" \
         "<|assistant|>\nSee you.</s>"
  assert ex["input_ids"] == [1] + tok(text, add_special_tokens=False).input_ids
  trained = tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
  assert trained.replace(" ", "") == "Hello!</s>Seeyou.</s>"


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
