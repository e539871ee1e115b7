"""Flax Mistral against transformers' PyTorch MistralForCausalLM."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bfpo_jax import model as M
from bfpo_jax.model import generate, hf_io, load_tokenizer
from bfpo_jax.model.config import REMAT_POLICIES
from bfpo_jax.model.generate import sample_token

VOCAB = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_config(**overrides):
  fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                sliding_window=None, tie_word_embeddings=False,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
  fields.update(overrides)
  return transformers.MistralConfig(**fields)


def _save_random_hf(path, seed=0, **overrides):
  torch.manual_seed(seed)
  config = _hf_config(**overrides)
  config._attn_implementation = "eager"
  hf_model = transformers.MistralForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norms, so their mapping is exercised
    for name, p in hf_model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  hf_model.save_pretrained(path, safe_serialization=True)
  return hf_model


def _hf_logits(hf_model, ids, mask=None, positions=None):
  kwargs = {}
  if mask is not None:
    kwargs["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
  if positions is not None:
    kwargs["position_ids"] = torch.tensor(np.asarray(positions))
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


CASES = {
    "gqa_untied": {},
    "sliding_window_4": {"sliding_window": 4},
    "tied": {"tie_word_embeddings": True},
    "mha_headdim16": {"num_key_value_heads": 4, "head_dim": 16},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_pair(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model = _save_random_hf(path, **CASES[request.param])
  cfg, params = hf_io.load_hf(path)
  return request.param, path, hf_model, cfg, params


def test_unpadded_logits_match_transformers(hf_pair):
  _, _, hf_model, cfg, params = hf_pair
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 12))
  ours = np.asarray(M.apply(cfg, params, ids))
  np.testing.assert_allclose(ours, _hf_logits(hf_model, ids), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_transformers_and_unpadded_rows(hf_pair, side):
  _, _, hf_model, cfg, params = hf_pair
  rng = np.random.default_rng(1)
  lengths = [12, 7, 9]
  ids = np.zeros((3, 12), np.int64)
  mask = np.zeros((3, 12), np.int64)
  rows = [rng.integers(3, VOCAB, n) for n in lengths]
  for i, row in enumerate(rows):
    where = slice(12 - len(row), 12) if side == "left" else slice(0, len(row))
    ids[i, where], mask[i, where] = row, 1
  positions = np.asarray(M.mistral.default_positions(jnp.asarray(mask)))
  ours = np.asarray(M.apply(cfg, params, ids, mask))
  theirs = _hf_logits(hf_model, ids, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
  for i, row in enumerate(rows):  # padding changes nothing for real tokens
    alone = np.asarray(M.apply(cfg, params, row[None]))[0]
    np.testing.assert_allclose(ours[i][real[i]], alone, atol=1e-4, rtol=1e-4)


def test_explicit_positions(hf_pair):
  _, _, hf_model, cfg, params = hf_pair
  ids = np.random.default_rng(2).integers(3, VOCAB, (1, 8))
  positions = np.arange(5, 13)[None]
  np.testing.assert_allclose(
      M.apply(cfg, params, ids, positions=positions),
      _hf_logits(hf_model, ids, positions=positions), atol=1e-4, rtol=1e-4)


def test_save_hf_round_trip_loads_in_transformers(hf_pair, tmp_path):
  name, _, hf_model, cfg, params = hf_pair
  out = str(tmp_path / "export")
  files = hf_io.save_hf(out, cfg, params)
  assert os.path.basename(files[1]) == "model.safetensors"
  reloaded = transformers.MistralForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  ids = np.random.default_rng(3).integers(3, VOCAB, (2, 10))
  np.testing.assert_allclose(_hf_logits(reloaded, ids),
                             _hf_logits(hf_model, ids), atol=1e-5, rtol=1e-5)
  assert reloaded.config.tie_word_embeddings == (name == "tied")


def test_sharded_save_with_index(tmp_path):
  src = str(tmp_path / "src")
  hf_model = _save_random_hf(src, seed=4)
  cfg, params = hf_io.load_hf(src)
  out = str(tmp_path / "sharded")
  files = hf_io.save_hf(out, cfg, params, max_shard_size="40KB")
  index_path = os.path.join(out, hf_io.INDEX_FILE)
  assert index_path in files
  with open(index_path) as f:
    index = json.load(f)
  shard_files = sorted(set(index["weight_map"].values()))
  assert len(shard_files) > 2
  assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
  assert not os.path.exists(os.path.join(out, "model.safetensors"))
  ids = np.random.default_rng(5).integers(3, VOCAB, (1, 9))
  reloaded = transformers.MistralForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(reloaded, ids),
                             _hf_logits(hf_model, ids), atol=1e-5)
  cfg2, params2 = hf_io.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_into_shardings_and_bf16(tmp_path):
  src = str(tmp_path / "src")
  _save_random_hf(src, seed=6)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  cfg, params = hf_io.load_hf(src, dtype=jnp.bfloat16, shardings=sharding)
  assert cfg.param_dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.bfloat16 and leaf.sharding == sharding


def test_bf16_forward_close_to_float32(tmp_path):
  src = str(tmp_path / "src")
  _save_random_hf(src, seed=7)
  cfg, params = hf_io.load_hf(src)
  ids = np.random.default_rng(8).integers(3, VOCAB, (2, 16))
  f32 = np.asarray(M.apply(cfg, params, ids))
  bf16 = np.asarray(M.apply(cfg.replace(dtype=jnp.bfloat16), params, ids))
  # Stated tolerance: bf16 compute keeps logits within 2% of their range.
  assert np.abs(bf16 - f32).max() <= 0.02 * np.abs(f32).max()
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_refuses_pickle_and_reports_bad_folders(tmp_path):
  pickle_only = tmp_path / "pickle"
  pickle_only.mkdir()
  _hf_config().save_pretrained(str(pickle_only))
  (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="pickle.*arbitrary code"):
    hf_io.load_hf(str(pickle_only))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_hf(str(tmp_path))
  src = str(tmp_path / "mismatch")
  _save_random_hf(src)
  _hf_config(num_hidden_layers=3).save_pretrained(src)
  with pytest.raises(ValueError, match="missing.*layers.2"):
    hf_io.load_hf(src)


def test_remat_gives_same_gradients():
  cfg = M.MistralConfig.tiny(vocab_size=VOCAB, sliding_window=3)
  params = M.init_params(cfg, jax.random.key(0))
  ids = np.random.default_rng(9).integers(0, VOCAB, (2, 8))

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(M.apply(c, p, ids))[..., 5])

  plain = jax.grad(loss)(params, cfg)
  for policy in REMAT_POLICIES:
    remat = jax.jit(jax.grad(loss), static_argnums=1)(
        params, cfg.replace(remat=True, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 remat, plain)


def test_logical_axes_cover_every_param():
  cfg = M.MistralConfig.tiny(tie_word_embeddings=False)
  shapes = M.abstract_params(cfg)
  axes = M.logical_axes(cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      axes, is_leaf=lambda x: isinstance(x, tuple))
  pairs = zip(jax.tree.leaves(shapes),
              jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))
  for shape, names in pairs:
    assert len(names) == len(shape.shape)
  assert axes["layers"][0]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
  assert axes["lm_head"]["kernel"] == ("embed", "vocab")


def _uncached_greedy(cfg, params, ids, mask, n):
  ids, mask = np.asarray(ids), np.asarray(mask)
  for _ in range(n):
    logits = np.asarray(M.apply(cfg, params, ids, mask))
    ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], 1)
    mask = np.concatenate([mask, np.ones((len(ids), 1), mask.dtype)], 1)
  return ids


@pytest.mark.parametrize("window", [None, 5])
def test_cached_greedy_equals_uncached_and_transformers(tmp_path, window):
  src = str(tmp_path / "src")
  hf_model = _save_random_hf(src, seed=10, sliding_window=window)
  cfg, params = hf_io.load_hf(src)
  rng = np.random.default_rng(11)
  ids = rng.integers(3, VOCAB, (2, 7))
  mask = np.ones_like(ids)
  ids[1, :3], mask[1, :3] = 0, 0  # left padding
  n_new = 8
  # A stop token no row emits, so all three decode the same n_new tokens.
  cached = np.asarray(generate(cfg, params, ids, mask, n_new,
                                 eos_token_id=VOCAB + 1))
  np.testing.assert_array_equal(cached,
                                _uncached_greedy(cfg, params, ids, mask, n_new))
  with torch.no_grad():
    theirs = hf_model.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
        max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
        eos_token_id=None).numpy()
  np.testing.assert_array_equal(cached, theirs)


def test_generate_stops_at_eos_and_samples_reproducibly():
  cfg = M.MistralConfig.tiny(vocab_size=VOCAB)
  params = M.init_params(cfg, jax.random.key(1))
  ids = np.random.default_rng(12).integers(3, VOCAB, (3, 5))
  greedy = np.asarray(generate(cfg, params, ids, None, 6,
                                 eos_token_id=VOCAB + 1))
  eos = int(greedy[0, 5])  # the first generated token of row 0
  stopped = np.asarray(generate(cfg, params, ids, None, 6, eos_token_id=eos,
                                  pad_token_id=0))
  assert stopped[0, 5] == eos and (stopped[0, 6:] == 0).all()
  for row in range(1, 3):  # other rows run on until their own first eos
    hits = np.flatnonzero(greedy[row, 5:] == eos)
    n = hits[0] + 1 if len(hits) else 6
    np.testing.assert_array_equal(stopped[row, 5:5 + n], greedy[row, 5:5 + n])
    assert (stopped[row, 5 + n:] == 0).all()
  key = jax.random.key(3)
  a = generate(cfg, params, ids, None, 6, temperature=1.0, top_p=0.9,
                 rng=key)
  b = generate(cfg, params, ids, None, 6, temperature=1.0, top_p=0.9,
                 rng=key)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="left-padded"):
    generate(cfg, params, ids, np.array([[1, 1, 1, 1, 0]] * 3), 2)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(np.asarray(draws))) == {0, 1}


def test_bundled_mistral_tokenizer_offline():
  tok = load_tokenizer()
  assert len(tok) == 32000
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  assert tok.convert_ids_to_tokens(tok("Hello", add_special_tokens=False)
                                   .input_ids) == ["▁Hello"]
  with pytest.raises(FileNotFoundError):
    load_tokenizer("/nonexistent/folder")


@pytest.mark.parametrize("window", [None, 3])
def test_packed_rows_equal_separate_sequences(window):
  cfg = M.MistralConfig.tiny(vocab_size=VOCAB, sliding_window=window)
  params = M.init_params(cfg, jax.random.key(5))
  rng = np.random.default_rng(13)
  a, b = rng.integers(3, VOCAB, 5), rng.integers(3, VOCAB, 7)
  ids = np.zeros((1, 16), np.int32)
  ids[0, :12] = np.concatenate([a, b])
  segments = np.zeros((1, 16), np.int32)
  segments[0, :5], segments[0, 5:12] = 1, 2
  packed = np.asarray(M.apply(cfg, params, ids, segment_ids=segments))[0]
  np.testing.assert_allclose(packed[:5], M.apply(cfg, params, a[None])[0],
                             atol=1e-5)
  np.testing.assert_allclose(packed[5:12], M.apply(cfg, params, b[None])[0],
                             atol=1e-5)
  np.testing.assert_array_equal(
      M.mistral.segment_positions(jnp.asarray(segments))[0, :12],
      list(range(5)) + list(range(7)))


def test_the_model_package_is_the_one_import_place():
  import bfpo_jax.model.generate as decoding_module  # noqa: F401
  from bfpo_jax import model, tokenizer
  from bfpo_jax.model import generate as generate_function
  from bfpo_jax.model.generate import generate as old_path
  from bfpo_jax.model.hf_io import load_hf as old_load_hf
  from bfpo_jax.model.tokenizer import load_tokenizer as old_tokenizer_path

  assert {"load_hf", "save_hf", "load_tokenizer", "generate"} <= set(
      model.__all__)
  assert model.load_tokenizer is tokenizer.load_tokenizer is old_tokenizer_path
  assert generate_function is old_path and model.load_hf is old_load_hf
  blocks = []
  for page in ("README.md", "docs/models.md"):  # the README links the API page
    with open(os.path.join(ROOT, page)) as f:
      blocks += re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
  imports = [line for block in blocks for line in block.splitlines()
             if re.match(r"\s*(from|import) bfpo_jax\.model", line)]
  assert imports, "docs/models.md shows how to import the model"
  for line in imports:
    assert re.match(r"from bfpo_jax\.model import ", line), line
    exec(line, {})


def test_the_data_package_does_not_import_the_model():
  code = ("import importlib, json, sys\n"
          "for m in ('pipeline', 'sources', 'readers', 'tokenize', '__main__'):\n"
          "  importlib.import_module('bfpo_jax.data.' + m)\n"
          "from bfpo_jax.tokenizer import load_tokenizer\n"
          "load_tokenizer()\n"
          "print(json.dumps(sorted(m for m in sys.modules\n"
          "                        if m.startswith('bfpo_jax'))))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "bfpo_jax.data.pipeline" in loaded
  assert not [m for m in loaded if m.startswith("bfpo_jax.model")], loaded
