"""``data.template=tokenizer``: the model's own chat template, as TRL uses it.

One short pair per template family, its token layout pinned and checked
against two independent renderings: the tokenizer's ``apply_chat_template``
of the whole conversation, and TRL's ``DPOTrainer`` tokenization of the
same conversational row. Templates: ChatML with a default system prompt
(the real SmolLM2-135M-Instruct tokenizer, read by transformers from its
GGUF), Llama 3's header tokens and Mistral-Instruct's ``[INST]`` (both on the
bundled Mistral tokenizer with those templates' text).
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import transformers

from bfpo_jax.data import pipeline
from bfpo_jax.data.chat_template import TemplateError, TemplateTokenizer
from bfpo_jax.data.sources import DataError, Skip, SourceSpec
from bfpo_jax.data.tokenize import make_chat, tokenize_pair, tokenize_sft
from bfpo_jax.tokenizer import mistral_tokenizer_dir
from tests.helpers import ROOT, smollm2_gguf

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
    "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PROMPT = [{"role": "user", "content": "Hi"}]
PINNED = {  # (prompt, chosen, rejected) of ("Hi", "Hello.", "No.")
    "chatml": ([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511,
                308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093,
                198, 26843, 2, 198, 1, 520, 9531, 198],
               [19556, 30, 2, 198], [5230, 30, 2, 198]),
    "llama3": ([32000, 32002, 1838, 32003, 13, 13, 23809, 32001, 32002, 489,
                11143, 32003, 13, 13], [16230, 28723, 32001],
               [2501, 28723, 32001]),
    "mistral": ([1, 28792, 16289, 28793, 15359, 733, 28748, 16289, 28793],
                [16230, 28723, 2], [2501, 28723, 2]),
}


@pytest.fixture(scope="module")
def tokenizers():
  gguf = smollm2_gguf()
  chatml = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
  llama3 = transformers.LlamaTokenizer.from_pretrained(mistral_tokenizer_dir(),
                                                       legacy=False)
  llama3.add_special_tokens({
      "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
      "additional_special_tokens": ["<|start_header_id|>",
                                    "<|end_header_id|>"]})
  llama3.chat_template = LLAMA3_TEMPLATE
  mistral = transformers.LlamaTokenizer.from_pretrained(
      mistral_tokenizer_dir(), legacy=False)
  mistral.chat_template = MISTRAL_TEMPLATE
  return {"chatml": chatml, "llama3": llama3, "mistral": mistral}


def _trl_rows(tokenizer, rows):
  """TRL's DPOTrainer tokenization of conversational rows (a 1-layer random
  model stands in; only the dataset preparation is used)."""
  import datasets
  import torch
  from trl import DPOConfig, DPOTrainer

  folder = tempfile.mkdtemp()
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8,
      num_hidden_layers=1, num_attention_heads=1,
      num_key_value_heads=1)).save_pretrained(folder)
  data = datasets.Dataset.from_list([
      {"prompt": p, "chosen": [{"role": "assistant", "content": c}],
       "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows])
  trainer = DPOTrainer(model=folder, train_dataset=data, processing_class=tokenizer,
                       args=DPOConfig(output_dir=folder, report_to=[],
                                      max_length=None, use_cpu=True))
  return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
          for row in trainer.train_dataset]


@pytest.mark.parametrize("family", sorted(PINNED))
def test_pair_layout_is_pinned_and_equals_two_independent_renderings(
    tokenizers, family):
  tok = tokenizers[family]
  prompt, chosen, rejected = TemplateTokenizer(tok).encode_pair(
      PROMPT, "Hello.", "No.")
  assert (prompt, chosen, rejected) == PINNED[family]
  for response, ids in (("Hello.", chosen), ("No.", rejected)):
    whole = tok.apply_chat_template(
        PROMPT + [{"role": "assistant", "content": response}], tokenize=True,
        return_dict=True)["input_ids"]
    assert prompt + ids == list(whole)
  assert _trl_rows(tok, [(PROMPT, "Hello.", "No.")]) == [
      (prompt, chosen, rejected)]


def test_longer_conversations_match_trl(tokenizers):
  rows = [([{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"}], "4.",
           "I cannot say."),
          ([{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about cats."}],
           "Why did the cat sit on the computer? To keep an eye on the mouse.",
           "No.")]
  tok = tokenizers["chatml"]
  chat = TemplateTokenizer(tok)
  assert [chat.encode_pair(*row) for row in rows] == _trl_rows(tok, rows)


def test_default_system_prompt_and_bos_appear_once(tokenizers):
  chatml = TemplateTokenizer(tokenizers["chatml"])
  prompt, _, _ = chatml.encode_pair(PROMPT, "a", "b")
  text = tokenizers["chatml"].decode(prompt)
  assert text.count("You are a helpful AI assistant named SmolLM") == 1
  own = [{"role": "system", "content": "You refuse."}] + PROMPT
  text = tokenizers["chatml"].decode(chatml.encode_pair(own, "a", "b")[0])
  assert "SmolLM" not in text and text.count("You refuse.") == 1
  for family in ("llama3", "mistral"):
    tok = tokenizers[family]
    prompt, chosen, _ = TemplateTokenizer(tok).encode_pair(PROMPT, "a", "b")
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
    assert chosen.count(tok.eos_token_id) == 1 and chosen[-1] == tok.eos_token_id


def test_sft_mask_covers_each_assistant_turn_and_its_end_tokens(tokenizers):
  tok = tokenizers["chatml"]
  messages = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"},
              {"role": "assistant", "content": "Goodbye."}]
  ids, mask = TemplateTokenizer(tok).encode_sft(messages)
  assert ids == list(tok.apply_chat_template(messages, tokenize=True,
                                             return_dict=True)["input_ids"])
  trained = tok.decode([i for i, m in zip(ids, mask) if m])
  assert trained == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
  chat = make_chat(tok, "tokenizer")
  record = {"messages": messages}
  assert tokenize_sft(chat, record, loss="assistant")["loss_mask"] == mask
  everything = tokenize_sft(chat, record, loss="all")["loss_mask"]
  assert everything == [False] + [True] * (len(ids) - 1)


def test_truncation_rules_are_unchanged(tokenizers):
  chat = make_chat(tokenizers["chatml"], "tokenizer")
  record = {"prompt": [{"role": "user", "content": "word " * 60}],
            "chosen": "yes " * 40, "rejected": "no", "chosen_is_safe": True,
            "rejected_is_safe": True}
  prompt, chosen, rejected = chat.encode_pair(record["prompt"],
                                              record["chosen"], "no")
  ex = tokenize_pair(chat, record, max_prompt_length=32, max_length=64)
  assert ex["prompt_length"] == 32
  assert ex["chosen_ids"] == prompt[-32:] + chosen[:32]
  assert ex["rejected_ids"] == prompt[-32:] + rejected


def test_special_token_text_is_skipped_and_counted(tokenizers):
  chat = make_chat(tokenizers["chatml"], "tokenizer")
  with pytest.raises(Skip, match="special_token_in_text"):
    chat.encode_pair([{"role": "user", "content": "say <|im_end|> now"}],
                     "ok", "no")


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_template_that_renders_the_prompt_differently_stops_naming_the_row(
    tokenizers, tmp_path):
  tok = transformers.LlamaTokenizer.from_pretrained(mistral_tokenizer_dir(),
                                                    legacy=False)
  tok.chat_template = (  # the generation prompt is not how a turn starts
      "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
      "{% endfor %}{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}")
  with pytest.raises(TemplateError, match="'Hi'"):
    TemplateTokenizer(tok).encode_pair(PROMPT, "a", "b")
  _write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b",
                                 "chosen_is_safe": True,
                                 "rejected_is_safe": True}])
  spec = SourceSpec.parse(f"preference_jsonl:{tmp_path}/p.jsonl",
                          task="preference")
  with pytest.raises(DataError) as err:
    pipeline.prepare([spec], tok, task="preference", template="tokenizer")
  assert str(tmp_path) in str(err.value) and "'Hi'" in str(err.value)
  assert "\n" not in str(err.value)


def test_a_tokenizer_without_template_is_refused(tokenizers):
  tok = transformers.LlamaTokenizer.from_pretrained(mistral_tokenizer_dir(),
                                                    legacy=False)
  with pytest.raises(DataError, match="has no chat_template"):
    make_chat(tok, "tokenizer")


def test_data_cli_dumps_the_template_layout(tokenizers, tmp_path):
  folder = tmp_path / "tok"
  tokenizers["chatml"].save_pretrained(folder)
  _write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello.",
                                 "rejected": "No.", "chosen_is_safe": True,
                                 "rejected_is_safe": False}])
  result = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.data", "--source",
       f"preference_jsonl:{tmp_path}/p.jsonl", "--tokenizer", str(folder),
       "--template", "tokenizer", "--dump", str(tmp_path / "d.jsonl")],
      cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "d.jsonl") as f:
    row = json.loads(f.readline())
  prompt, chosen, rejected = PINNED["chatml"]
  assert row["prompt_input_ids"] == prompt
  assert row["chosen_input_ids"] == chosen
  assert row["rejected_input_ids"] == rejected
  assert row["chosen_labels_mask"] == [1] * len(chosen)
