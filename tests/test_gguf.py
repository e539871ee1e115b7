"""GGUF files in: against transformers' own GGUF loading of the same file.

Tiny random Llama / Qwen2 / Qwen3 models are written as GGUF files the way
llama.cpp writes them (tests/gguf_files.py: q/k rows permuted, tensors in
every supported type), then read by ``bfpo_jax.model.load_hf`` and by
``transformers`` (its own torch dequantization): every tensor equal, logits
within 1e-4. Tokenizers: a byte-level BPE trained here and the real Mistral
SentencePiece model, written into GGUF metadata and rebuilt, give the ids
transformers' GGUF tokenizer and the original tokenizer give.
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

from bfpo_jax import model as M
from bfpo_jax.model import gguf_io, hf_io
from bfpo_jax.model.gguf_tokenizer import load_gguf_tokenizer
from bfpo_jax.tokenizer import mistral_tokenizer_dir
from tests.gguf_files import Q, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TYPES = {  # every type the reader promises, spread over the tensors
    "embed_tokens": Q.Q8_0, "lm_head": Q.Q6_K,
    "layers.0.self_attn.q_proj": Q.Q4_K, "layers.0.self_attn.k_proj": Q.Q5_K,
    "layers.0.self_attn.v_proj": Q.Q4_0, "layers.0.self_attn.o_proj": Q.Q4_1,
    "layers.0.mlp.gate_proj": Q.Q5_0, "layers.0.mlp.up_proj": Q.Q5_1,
    "layers.0.mlp.down_proj": Q.Q2_K, "layers.1.self_attn.q_proj": Q.Q3_K,
    "layers.1.self_attn.k_proj": Q.BF16, "layers.1.self_attn.v_proj": Q.F16,
    "layers.1.mlp": Q.Q8_0,
}
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Hello, world! How are you doing today?",
             "In 2024 there were 365 days; 1,000,000 is a million.",
             "def f(x):\n    return x ** 2  # square\n",
             "Don't stop believing, it's y'all's turn.",
             "naïve café déjà vu — 東京 😊"] * 20


def _random_model(kind, **overrides):
  fields = dict(vocab_size=256, hidden_size=256, intermediate_size=512,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  fields.update(overrides)
  classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
  config_cls, model_cls = classes[kind]
  torch.manual_seed(0)
  model = model_cls(config_cls(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


CASES = {
    "llama_all_types": ("llama", {}, ALL_TYPES),
    "llama_mha_tied_q8": ("llama", dict(num_key_value_heads=4,
                                        tie_word_embeddings=True),
                          {"": Q.Q8_0}),
    "qwen2_biases_q4k": ("qwen2", {}, {"proj": Q.Q4_K, "embed": Q.F16}),
    "qwen3_qknorm_q6k": ("qwen3", dict(head_dim=128, tie_word_embeddings=True),
                         {"proj": Q.Q6_K}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def gguf_case(request, tmp_path_factory):
  kind, overrides, types = CASES[request.param]
  folder = tmp_path_factory.mktemp(request.param)
  path = write_gguf(str(folder / "model.gguf"), _random_model(kind, **overrides),
                    kind, types)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      str(folder), gguf_file="model.gguf", dtype=torch.float32).eval()
  return request.param, path, theirs


def _hand_decoded_q5(data, qtype):
  """Q5_0 / Q5_1 blocks decoded from ggml's block layout (``ggml-quants.c``
  ``dequantize_row_q5_0`` / ``_q5_1``): scale (and min) in float16, 32 high
  bits, 16 bytes of low nibbles."""
  out = []
  for block in data.reshape(-1, 22 if qtype == Q.Q5_0 else 24):
    d = float(block[:2].view(np.float16)[0])
    offset, m = (2, -16 * d) if qtype == Q.Q5_0 else (
        4, float(block[2:4].view(np.float16)[0]))
    qh = int(block[offset:offset + 4].view(np.uint32)[0])
    qs = block[offset + 4:offset + 20].astype(int)
    low = [(q & 15) | (((qh >> j) << 4) & 16) for j, q in enumerate(qs)]
    high = [(q >> 4) | ((qh >> (j + 12)) & 16) for j, q in enumerate(qs)]
    out += [x * d + m for x in low + high]
  return np.array(out, np.float32)


@pytest.mark.parametrize("kind", gguf_io.TENSOR_TYPES)
def test_dequantization_equals_an_independent_decoder(kind):
  """The reader's values against transformers' own torch decoders (Q4_0,
  Q4_1, Q8_0, Q2_K..Q6_K), a hand decoder (Q5_0, Q5_1) or plain casts."""
  from types import SimpleNamespace

  from transformers.integrations.gguf import dequant

  from tests.gguf_files import quantized

  qtype = Q[kind]
  rng = np.random.default_rng(0)
  data, _ = quantized(rng.normal(size=(3, 512)).astype(np.float32), qtype, rng)
  tensor = SimpleNamespace(name="t", tensor_type=qtype, shape=(512, 3),
                           data=data)
  ours = gguf_io.dequantize(tensor).reshape(-1)
  if kind in ("F32", "F16"):
    want = data.astype(np.float32).reshape(-1)
  elif kind == "BF16":
    want = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  elif kind in ("Q5_0", "Q5_1"):
    want = _hand_decoded_q5(data, qtype)
  else:
    want = dequant.dequantize(torch.from_numpy(data.reshape(-1).copy()),
                              int(qtype)).numpy()
  np.testing.assert_array_equal(ours, want.reshape(-1))


def test_every_tensor_and_the_config_equal_transformers_gguf_loading(gguf_case):
  name, path, theirs = gguf_case
  cfg, params = hf_io.load_hf(path)
  hf = theirs.config
  for field in ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings"):
    assert getattr(cfg, field) == pytest.approx(getattr(hf, field)), field
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
  assert cfg.model_type == hf.model_type == CASES[name][0]
  state = {k: v.numpy() for k, v in theirs.state_dict().items()}
  ours = dict(jax_tree_to_hf(cfg, params))
  if cfg.tie_word_embeddings:
    state.pop("lm_head.weight")
  assert sorted(ours) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def jax_tree_to_hf(cfg, params):
  import jax

  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, transpose = hf_io.hf_name(M.param_path(path))
    x = np.asarray(leaf)
    yield name, (x.T if transpose else x)


def test_logits_equal_transformers_within_1e4(gguf_case):
  _, path, theirs = gguf_case
  cfg, params = hf_io.load_hf(path)
  ids = np.random.default_rng(0).integers(3, 256, (2, 20))
  with torch.no_grad():
    want = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(M.apply(cfg, params, ids)), want,
                             atol=1e-4, rtol=1e-4)


def test_convert_writes_a_folder_transformers_and_we_load(tmp_path):
  model = _random_model("qwen2", vocab_size=300)
  path = write_gguf(str(tmp_path / "m.gguf"), model, "qwen2",
                    {"proj": Q.Q8_0}, tokenizer=_bpe_metadata("qwen2"))
  out = str(tmp_path / "folder")
  result = subprocess.run([sys.executable, "-m", "bfpo_jax.model.convert", path,
                           out, "--dtype", "float32"], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  for file in ("config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "generation_config.json", "README.md"):
    assert os.path.isfile(os.path.join(out, file)), file
  with open(os.path.join(out, "README.md")) as f:
    card = f.read()
  assert "m.gguf" in card and "MOSTLY_Q8_0" in card and "14 Q8_0" in card
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  want = {k: v.numpy() for k, v in transformers.AutoModelForCausalLM
          .from_pretrained(str(tmp_path), gguf_file="m.gguf").state_dict()
          .items()}
  for key, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), want[key], err_msg=key)
  assert set(load_file(os.path.join(out, "model.safetensors"))) <= set(want)
  cfg, _ = hf_io.load_hf(out)
  assert cfg == hf_io.load_config(path)


def _bpe_metadata(pre):
  """A byte-level BPE trained on SENTENCES, as GGUF tokenizer metadata."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  state = json.loads(tok.to_str())["model"]
  vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab]
  merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
  types = [3 if t in specials else 1 for t in tokens]

  def add(writer):
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(pre == "llama-bpe")
    writer.add_chat_template(
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + "
        "m['content'] + '<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
  return add


TEXTS = ["Hello, world! How are you?", "  two  spaces\tand a tab\r\nCRLF ",
         "In 2024 there were 365 days and 12345 seconds.",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
         "Don't stop; it's y'all's. naïve café 東京 😊", ""]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_byte_level_tokenizer_gives_transformers_gguf_ids(pre, tmp_path):
  model = _random_model("llama", vocab_size=300)
  write_gguf(str(tmp_path / "t.gguf"), model, "llama", {},
             tokenizer=_bpe_metadata(pre))
  ours = load_gguf_tokenizer(str(tmp_path / "t.gguf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                      gguf_file="t.gguf")
  for text in TEXTS:
    if pre == "smollm" and any(c.isdigit() for c in text):
      continue  # transformers splits digits GPT-2's way here: next test
    for special in (False, True):
      assert (ours(text, add_special_tokens=special).input_ids
              == theirs(text, add_special_tokens=special).input_ids), text
    assert ours.decode(ours(text, add_special_tokens=False).input_ids) == text
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>")
  messages = [{"role": "user", "content": "Hi"}]
  assert (ours.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=True)
          == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm_pre_tokenizer_splits_every_digit_as_llama_cpp(tmp_path):
  """llama.cpp's ``smollm`` splits digits one by one before GPT-2's regex
  (SmolLM's own tokenizer has ``Digits(individual_digits=True)``);
  transformers' GGUF loader has no entry for it. On a vocabulary that merges
  digits, the two differ, and ours keeps each digit alone."""
  model = _random_model("llama", vocab_size=300)
  write_gguf(str(tmp_path / "t.gguf"), model, "llama", {},
             tokenizer=_bpe_metadata("smollm"))
  ours = load_gguf_tokenizer(str(tmp_path / "t.gguf"))
  pieces = ours.convert_ids_to_tokens(ours("In 2024 and 365.").input_ids)
  assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024365")


def test_sentencepiece_tokenizer_gives_the_original_ids(tmp_path):
  """The real Mistral-7B SentencePiece model, written into GGUF metadata as
  llama.cpp writes it, is rebuilt with the ids of the original tokenizer
  (and of transformers' GGUF loading, except on runs of spaces, where
  transformers' rebuild differs from the original and ours does not)."""
  from sentencepiece import sentencepiece_model_pb2 as spm

  source = os.path.join(mistral_tokenizer_dir(), "tokenizer.model")
  proto = spm.ModelProto()
  with open(source, "rb") as f:
    proto.ParseFromString(f.read())

  def add(writer):
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)

  model = _random_model("llama", vocab_size=len(proto.pieces), hidden_size=32,
                        intermediate_size=32)
  write_gguf(str(tmp_path / "s.gguf"), model, "llama", {}, tokenizer=add)
  ours = load_gguf_tokenizer(str(tmp_path / "s.gguf"))
  original = transformers.LlamaTokenizer.from_pretrained(
      mistral_tokenizer_dir(), legacy=False)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                      gguf_file="s.gguf")
  for text in TEXTS[:3] + ["[INST] Hi [/INST]", " leading space", "x\n\ny"]:
    want = original(text, add_special_tokens=False).input_ids
    assert ours(text, add_special_tokens=False).input_ids == want, text
    if "  " not in text:  # transformers' GGUF rebuild merges runs of
      # spaces differently from the SentencePiece model itself
      assert theirs(text, add_special_tokens=False).input_ids == want, text
    # The file says add_bos_token, as llama.cpp writes Mistral's: BOS first.
    assert ours(text).input_ids == [1] + want, text
  assert ours.bos_token == "<s>" and ours.eos_token == "</s>"


def test_bad_files_are_refused_in_one_line(tmp_path):
  model = _random_model("llama", hidden_size=32, intermediate_size=32)
  good = write_gguf(str(tmp_path / "good.gguf"), model, "llama", {})
  data = open(good, "rb").read()
  cases = {"truncated.gguf": data[:len(data) // 2],
           "badmagic.gguf": b"NOPE" + data[4:], "empty.gguf": b""}
  for name, content in cases.items():
    with open(tmp_path / name, "wb") as f:
      f.write(content)
    with pytest.raises(gguf_io.GGUFError) as err:
      hf_io.load_hf(str(tmp_path / name))
    assert name in str(err.value) and "\n" not in str(err.value)
  unknown = write_gguf(str(tmp_path / "phi.gguf"), model, "phi2", {})
  with pytest.raises(gguf_io.GGUFError, match="unsupported GGUF architecture "
                     "'phi2'"):
    hf_io.load_config(unknown)
  freqs = write_gguf(str(tmp_path / "freqs.gguf"), model, "llama", {},
                     extra=lambda w: w.add_tensor(
                         "rope_freqs.weight", np.ones(4, np.float32)))
  with pytest.raises(gguf_io.GGUFError, match="rope_freqs"):
    hf_io.load_config(freqs)


def test_an_unsupported_tensor_type_is_named(tmp_path):
  model = _random_model("llama", hidden_size=256, intermediate_size=256)
  path = write_gguf(str(tmp_path / "iq.gguf"), model, "llama",
                    {"layers.0.mlp.up_proj": Q.IQ4_NL})
  with pytest.raises(gguf_io.GGUFError, match="blk.0.ffn_up.weight has type "
                     "IQ4_NL, not supported") as err:
    hf_io.load_hf(path)
  assert "iq.gguf" in str(err.value) and "\n" not in str(err.value)


def test_convert_cli_exit_code_2_and_one_line(tmp_path):
  (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00")
  result = subprocess.run([sys.executable, "-m", "bfpo_jax.model.convert",
                           str(tmp_path / "x.gguf"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "x.gguf" in result.stderr
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def chatml_gguf(tmp_path_factory):
  """A tiny random Qwen2 GGUF with a ChatML template and a trained BPE."""
  folder = tmp_path_factory.mktemp("chatml")
  return write_gguf(str(folder / "chat.gguf"),
                    _random_model("qwen2", vocab_size=300), "qwen2",
                    {"proj": Q.Q8_0}, tokenizer=_bpe_metadata("qwen2"))


@pytest.mark.slow
def test_train_from_a_gguf_file_exports_its_own_template(chatml_gguf,
                                                         tmp_path):
  """``model.hf_path`` may be a GGUF file; with ``data.template=tokenizer``
  the export's tokenizer carries the file's chat template."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", "--config", "configs/tiny.py",
       "--workdir", str(workdir), f"--config.model.hf_path={chatml_gguf}",
       "--config.tokenizer=", "--config.data.template=tokenizer",
       "--config.trainable.mode=selective", "--config.max_steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  exported = transformers.AutoTokenizer.from_pretrained(workdir / "hf_export")
  assert exported.chat_template == load_gguf_tokenizer(chatml_gguf).chat_template
  with open(workdir / "hf_export" / "README.md") as f:
    assert "the base model's own" in f.read()


@pytest.mark.slow
def test_evaluate_a_gguf_file_with_its_own_chat_template(chatml_gguf,
                                                         tmp_path):
  out = tmp_path / "eval"
  data = os.path.join(ROOT, "tests", "safehelp_data", "advbench.csv")
  result = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.evaluate", "--model", chatml_gguf,
       "--suite", "safehelp:generative", "--judge", "refusal", "--limit", "2",
       "--max_gen_toks", "4", "--bootstrap_iters", "0", "--out", str(out),
       "--data", f"advbench={data}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "safehelp.json") as f:
    assert json.load(f)["chat_template"] == "the tokenizer's"
  with open(out / "samples_advbench.jsonl") as f:
    prompt = json.loads(f.readline())["arguments"][0][0]
  assert prompt.startswith("<|im_start|>user\n") and prompt.endswith(
      "<|im_start|>assistant\n")
