"""Token layouts against the reference's own path: the Zephyr template rendered
by transformers, the Hub tokenizer's behaviour, and trl's DPO tokenization."""

import re

import numpy as np
import pytest
import transformers

from bfpo_jax.data import tokenize as tk
from bfpo_jax.data.tokenize import (
    CHAT_TEMPLATE,
    ChatTokenizer,
    dump_record,
    tokenize_pair,
    tokenize_sft,
    truncate_pair,
)
from bfpo_jax.model.tokenizer import load_tokenizer, mistral_tokenizer_dir

PAIR = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.",
        "rejected": "No.", "chosen_is_safe": True, "rejected_is_safe": True}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def hub_tok():
  """The Mistral tokenizer as the Hub's files run it (tokenizer.json prepends
  the word marker to every segment after a special token; tokenizer_config
  adds BOS), with the reference's chat template."""
  t = transformers.LlamaTokenizer.from_pretrained(
      mistral_tokenizer_dir(), legacy=True, add_bos_token=True)
  t.chat_template = CHAT_TEMPLATE
  return t


def _trl_tokenize_row(tok, prompt, chosen, rejected, max_length,
                      max_prompt_length):
  """trl's DPOTrainer.tokenize_row (keep_end), as the reference runs it."""
  def answer(text):  # build_tokenized_answer
    full = tok(prompt + text, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
      start -= 1
    return {"prompt": [tok.bos_token_id] + full[:start],
            "answer": full[start:] + [tok.eos_token_id]}

  sides = [answer(chosen), answer(rejected)]
  longer = max(len(s["answer"]) for s in sides)
  for s in sides:
    if len(s["prompt"]) + longer > max_length:
      s["prompt"] = s["prompt"][-max_prompt_length:]
  for s in sides:
    if len(s["prompt"]) + longer > max_length:
      s["answer"] = s["answer"][: max_length - max_prompt_length]
  return sides


def _reference_texts(hub_tok, record):
  """The reference's apply_chat_template(task="bfpo") strings."""
  prompt = record["prompt"]
  if prompt[0]["role"] != "system":
    prompt = [{"role": "system", "content": ""}] + prompt
  render = lambda m: hub_tok.apply_chat_template(m, tokenize=False)  # noqa: E731
  return (render(prompt),
          render([{"role": "assistant", "content": record["chosen"]}]),
          render([{"role": "assistant", "content": record["rejected"]}]))


RECORDS = [
    PAIR,
    {"prompt": [{"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "Another one, please?"}],
     "chosen": "Seven, because it has no divisors but 1 and itself.",
     "rejected": "Nine.", "chosen_is_safe": True, "rejected_is_safe": True},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "  spaces  and\ttabs\n\nlines "}],
     "chosen": " leading space", "rejected": "ünïcödé ✓",
     "chosen_is_safe": False, "rejected_is_safe": True},
]


@pytest.mark.parametrize("lengths", [(1024, 512), (40, 24), (60, 16)])
@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_reference_layout_equals_trl_on_the_rendered_template(
    tok, hub_tok, index, lengths):
  max_length, max_prompt_length = lengths
  record = RECORDS[index]
  ex = tokenize_pair(ChatTokenizer(tok), record, max_length=max_length,
                     max_prompt_length=max_prompt_length)
  chosen, rejected = _trl_tokenize_row(hub_tok, *_reference_texts(hub_tok, record),
                                       max_length, max_prompt_length)
  n = ex["prompt_length"]
  assert chosen["prompt"] == rejected["prompt"] == ex["chosen_ids"][:n]
  assert ex["chosen_ids"][n:] == chosen["answer"]
  assert ex["rejected_ids"][n:] == rejected["answer"]


def test_the_template_layout_in_tokens(tok):
  ex = tokenize_pair(ChatTokenizer(tok), PAIR)
  n = ex["prompt_length"]
  decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
  # An empty system turn first, then the user turn; BOS starts the prompt.
  assert ex["chosen_ids"][0] == tok.bos_token_id
  assert decode(ex["chosen_ids"][1:n]).replace(" ", "") == (
      "<|system|>\n</s>\n<|user|>\nHi</s>\n")
  # The response: the rendered assistant message, its newline, trl's EOS.
  assert decode(ex["chosen_ids"][n:]).replace(" ", "") == (
      "<|assistant|>\nHello.</s>\n</s>")
  # What the Hub's Zephyr tokenizer gives for "</s>\n<|assistant|>\n".
  assert ex["chosen_ids"][n - 3:n + 7] == [2, 28705, 13, 28789, 28766, 489,
                                           11143, 28766, 28767, 13]


def _docstring_lists(name):
  doc = tk.__doc__
  blocks = re.findall(r"::\n\n(.*?)\n\n", doc, flags=re.S)
  out = []
  for block in blocks:
    fields = re.findall(r"(\w+_input_ids)\s+\[([^\]]*)\]", block)
    out.append({k: [int(x) for x in v.split(",")] for k, v in fields})
  return out[{"reference": 0, "generation": 1}[name]]


@pytest.mark.parametrize("template", ["reference", "generation"])
def test_docstring_ids_are_what_the_code_writes(tok, template):
  dumped = dump_record(tokenize_pair(ChatTokenizer(tok, template), PAIR),
                       "preference")
  expected = _docstring_lists(template)
  assert set(expected) == {"prompt_input_ids", "chosen_input_ids",
                           "rejected_input_ids"}
  for key, ids in expected.items():
    assert dumped[key] == ids, key


def test_generation_layout_equals_the_hub_tokenizer_in_one_piece(tok, hub_tok):
  record = RECORDS[2]
  ex = tokenize_pair(ChatTokenizer(tok, "generation"), record)
  prompt_text = hub_tok.apply_chat_template(record["prompt"], tokenize=False,
                                            add_generation_prompt=True)
  assert prompt_text.endswith("</s>\n<|assistant|>\n")
  for side in ("chosen", "rejected"):
    whole = [1] + hub_tok(prompt_text + record[side] + "</s>",
                          add_special_tokens=False).input_ids
    assert ex[f"{side}_ids"] == whole
  prompt_ids = [1] + hub_tok(prompt_text, add_special_tokens=False).input_ids
  assert ex["chosen_ids"][: ex["prompt_length"]] == prompt_ids


@pytest.mark.parametrize("template,eos_count", [("reference", 4),
                                                ("generation", 2)])
def test_user_text_cannot_inject_special_tokens(tok, template, eos_count):
  record = {"prompt": [{"role": "user", "content": "say </s> please"}],
            "chosen": "ok </s> done", "rejected": "no", "chosen_is_safe": True,
            "rejected_is_safe": True}
  ex = tokenize_pair(ChatTokenizer(tok, template), record)
  eos = [i for i, t in enumerate(ex["chosen_ids"]) if t == tok.eos_token_id]
  # Only the template's EOS tokens (and trl's last one), none from the text.
  assert len(eos) == eos_count and eos[-1] == len(ex["chosen_ids"]) - 1


def test_trl_truncation_rule_on_long_prompts_and_responses():
  p, c, r = list(range(100, 160)), list(range(30)), list(range(10))
  cut = lambda *a, **k: truncate_pair(*a, max_prompt_length=32,  # noqa: E731
                                      max_length=64, **k)
  # Fits: nothing is cut, even a prompt longer than max_prompt_length.
  assert cut(p[:40], c[:20], r) == (p[:40], c[:20], r)
  # Prompt + the longer response too long: the prompt keeps its last 32
  # tokens (its first token, BOS, goes too); the responses fit after that.
  assert cut(p, c, r) == (p[-32:], c, r)
  # Still too long: both responses are cut to 64 - 32.
  long_c = list(range(50))
  assert cut(p, long_c, r) == (p[-32:], long_c[:32], r)
  # A short prompt is never cut; the responses are.
  assert cut(p[:5], long_c + long_c, r) == (p[:5], (long_c + long_c)[:32], r)


def test_prompt_first_truncation_keeps_bos_and_prompt_end(tok):
  chat = ChatTokenizer(tok)
  long_prompt = " ".join(f"word{i}" for i in range(200))
  record = dict(PAIR, prompt=[{"role": "user", "content": long_prompt}],
                chosen="x " * 100)
  full, _, _ = chat.encode_pair(record["prompt"], record["chosen"],
                                record["rejected"])
  ex = tokenize_pair(chat, record, max_prompt_length=32, max_length=48,
                     truncation="prompt_first")
  assert ex["prompt_length"] == 32
  assert ex["chosen_ids"][0] == chat.bos_id
  assert ex["chosen_ids"][1:32] == full[-31:]
  assert len(ex["chosen_ids"]) == 48  # response cut on the right
  with pytest.raises(Exception, match="no_room_for_response"):
    tokenize_pair(chat, record, max_prompt_length=64, max_length=64,
                  truncation="prompt_first")


def test_sft_example_is_trls_packed_document(tok, hub_tok):
  msgs = [{"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Bye"},
          {"role": "assistant", "content": "See you."}]
  ex = tokenize_sft(ChatTokenizer(tok), {"messages": msgs}, max_length=None)
  # The reference: apply_chat_template with an empty system turn added, then
  # trl's packing: tokenizer(text) (BOS added) + the EOS concatenation token.
  text = hub_tok.apply_chat_template(
      [{"role": "system", "content": ""}] + msgs, tokenize=False)
  assert ex["input_ids"] == hub_tok(text).input_ids + [2]
  assert ex["loss_mask"] == [False] + [True] * (len(ex["input_ids"]) - 1)


def test_sft_assistant_mask_in_the_generation_layout(tok, hub_tok):
  msgs = [{"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Bye"},
          {"role": "assistant", "content": "See you."}]
  ex = tokenize_sft(ChatTokenizer(tok, "generation"), {"messages": msgs},
                    loss="assistant")
  text = "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n" \
         "<|assistant|>\nSee you.</s>"
  assert ex["input_ids"] == [1] + hub_tok(text, add_special_tokens=False).input_ids
  ids = np.array(ex["input_ids"])[np.array(ex["loss_mask"])]
  assert tok.decode(ids).replace(" ", "") == "Hello!</s>Seeyou.</s>"


class _MergingTokenizer:
  """Characters as tokens, except that "\nA" is one token."""

  bos_token_id, eos_token_id = 1, 2

  def __call__(self, text, **_):
    ids, i = [], 0
    while i < len(text):
      merged = text[i:i + 2] == "\nA"
      ids.append(1000 if merged else ord(text[i]) + 3)
      i += 2 if merged else 1
    return {"input_ids": ids}


def test_a_boundary_that_merges_takes_trls_side(tok):
  chat = ChatTokenizer(tok)
  # When the head's last token merges into the body, the merged token belongs
  # to the body (trl's build_tokenized_answer).
  head, body = chat.split("Hello wor", "ld")
  assert head + body == chat.encode("Hello world")
  assert head == chat.encode("Hello")
  merging = ChatTokenizer(_MergingTokenizer(), "generation")
  head, body = merging.split("x\n", "AB")
  assert (head, body) == ([ord("x") + 3], [1000, ord("B") + 3])
  # Different prompt tokens for the two responses: skipped and counted.
  with pytest.raises(Exception, match="prompt_merges_with_response"):
    merging.encode_pair([{"role": "user", "content": "x"}], "A", "B")


@pytest.mark.parametrize("template", ["reference", "generation"])
def test_generation_prompt_is_the_trained_prefix(tok, hub_tok, template):
  chat = ChatTokenizer(tok, template)
  record = RECORDS[2]
  prompt, chosen, _ = chat.encode_pair(record["prompt"], record["chosen"],
                                       record["rejected"])
  got = chat.encode_prompt(record["prompt"])
  assert got[:len(prompt)] == prompt
  assert (prompt + chosen)[:len(got)] == got
  if template == "generation":  # the reference tokenizes turn by turn (trl)
    text = hub_tok.apply_chat_template(record["prompt"], tokenize=False,
                                       add_generation_prompt=True)
    assert got == [1] + hub_tok(text, add_special_tokens=False).input_ids
