"""Llama checkpoints against transformers' PyTorch LlamaForCausalLM."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bfpo_jax import model as M
from bfpo_jax.model import hf_io
from tests.helpers import assert_greedy_equals_transformers

VOCAB = 128
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CASES = {  # positions run past original_max_position_embeddings (8)
    "mha_biases_llama3": dict(num_key_value_heads=4, attention_bias=True,
                              mlp_bias=True, rope_theta=500000.0,
                              rope_scaling=LLAMA3),
    "gqa_tied_linear": dict(num_key_value_heads=2, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear",
                                          "factor": 2.0}),
    "gqa_yarn_headdim8": dict(num_key_value_heads=1, head_dim=8,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 8}),
}


def _save_random_llama(path, seed=0, **overrides):
  fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)
  fields.update(overrides)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**fields)
  config._attn_implementation = "eager"
  hf_model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in hf_model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  hf_model.save_pretrained(path, safe_serialization=True)
  return hf_model


def _logits(hf_model, ids, mask=None):
  kwargs = {}
  if mask is not None:
    kwargs["attention_mask"] = torch.tensor(mask)
  with torch.no_grad():
    return hf_model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def llama(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model = _save_random_llama(path, **CASES[request.param])
  cfg, params = hf_io.load_hf(path)
  return request.param, path, hf_model, cfg, params


def test_config_reads_llama_fields(llama):
  name, _, _, cfg, params = llama
  assert cfg.model_type == "llama" and cfg.sliding_window is None
  assert cfg.rope_type == CASES[name]["rope_scaling"]["rope_type"]
  q_proj = params["layers"][0]["self_attn"]["q_proj"]
  assert ("bias" in q_proj) == ("biases" in name)


def test_logits_match_transformers_unpadded_and_left_padded(llama):
  _, _, hf_model, cfg, params = llama
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, (2, 24))
  np.testing.assert_allclose(M.apply(cfg, params, ids), _logits(hf_model, ids),
                             atol=1e-4, rtol=1e-4)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  ours = np.asarray(M.apply(cfg, params, ids, mask))
  theirs = _logits(hf_model, ids, mask)
  np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4,
                             rtol=1e-4)


def test_save_hf_writes_a_llama_folder_transformers_loads(llama, tmp_path):
  _, _, hf_model, cfg, params = llama
  out = str(tmp_path / "export")
  hf_io.save_hf(out, cfg, params)
  with open(f"{out}/config.json") as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  assert isinstance(reloaded, transformers.LlamaForCausalLM)
  ids = np.random.default_rng(1).integers(3, VOCAB, (1, 20))
  np.testing.assert_allclose(_logits(reloaded, ids), _logits(hf_model, ids),
                             atol=1e-5, rtol=1e-5)
  assert hf_io.load_config(out) == cfg


@pytest.mark.parametrize("llama", ["mha_biases_llama3"], indirect=True)
def test_cached_greedy_equals_transformers(llama):
  _, _, hf_model, cfg, params = llama
  assert_greedy_equals_transformers(hf_model, cfg, params, VOCAB)


def test_bf16_llama_loads_in_bf16(tmp_path):
  _save_random_llama(str(tmp_path), **CASES["mha_biases_llama3"])
  cfg, params = hf_io.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  assert params["layers"][0]["self_attn"]["o_proj"]["bias"].dtype == jnp.bfloat16


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "unsupported architecture GPT2LMHeadModel: supported are "
     "MistralForCausalLM, LlamaForCausalLM"),
    ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
     "unsupported architecture LlamaForSequenceClassification"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic",
                                              "factor": 2.0}},
     "unsupported rope_type 'dynamic'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "unsupported hidden_act"),
])
def test_unsupported_folders_are_refused_in_one_line(tmp_path, config, message):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=message) as err:
    hf_io.load_hf(str(tmp_path))
  assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
