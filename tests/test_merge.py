"""python -m bfpo_jax.merge: the parents at W = 0 and 1, their mean at 0.5,
checked on the folders loaded back; refusals in one line."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import ModelCard

from bfpo_jax import merge
from bfpo_jax.model import init_params, load_hf, load_tokenizer, save_hf
from tests.helpers import ROOT, tiny_config

CFG = tiny_config()


def _folder(path, seed, cfg=CFG, dtype=jnp.float32, chat_template=None):
  """A random tiny model saved as an HF folder with the bundled tokenizer."""
  params = init_params(cfg, jax.random.key(seed))
  save_hf(str(path), cfg, params, dtype=dtype)
  tokenizer = load_tokenizer()
  if chat_template:
    tokenizer.chat_template = chat_template
  tokenizer.save_pretrained(str(path))
  return str(path)


def _leaves(folder):
  params = load_hf(folder)[1]
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
  root = tmp_path_factory.mktemp("parents")
  return (_folder(root / "a", 0),
          _folder(root / "b", 1, chat_template="{{ 'B' }}"))


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.5, 0.25])
def test_merge_is_the_parents_at_the_ends_and_their_mix_between(
    parents, tmp_path, weight):
  a, b = parents
  out = str(tmp_path / "merged")
  summary = merge.main([a, b, "--weight", str(weight), "--out", out])
  assert summary["merged"] == summary["tensors"] == len(_leaves(a))
  got, want_a, want_b = _leaves(out), _leaves(a), _leaves(b)
  assert got.keys() == want_a.keys()
  for name in got:
    if weight in (0.0, 1.0):  # exactly a parent
      np.testing.assert_array_equal(got[name],
                                    want_a[name] if weight == 0 else want_b[name])
    else:
      np.testing.assert_allclose(
          got[name], (1 - weight) * want_a[name] + weight * want_b[name],
          rtol=1e-6, atol=1e-7, err_msg=name)


def test_merged_folder_has_a_card_naming_both_parents_and_a_tokenizer(
    parents, tmp_path):
  a, b = parents
  out = str(tmp_path / "merged")
  merge.main([a, b, "--weight", "0.25", "--out", out])
  card = ModelCard.load(os.path.join(out, "README.md"))
  assert "merge" in card.data.tags
  assert f"`{a}` | 0.75" in card.text and f"`{b}` | 0.25" in card.text
  assert "W = 0.25" in card.text
  # B's tokenizer carries its own chat template (chat_template.jinja).
  assert "B's differ in chat_template.jinja." in card.text
  # The tokenizer is A's, byte for byte.
  assert not os.path.exists(os.path.join(out, "chat_template.jinja"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(a, name), "rb") as f, \
        open(os.path.join(out, name), "rb") as g:
      assert f.read() == g.read(), name
  assert load_tokenizer(out).chat_template == load_tokenizer(a).chat_template


def test_only_mixes_the_matching_tensors(parents, tmp_path):
  a, b = parents
  out = str(tmp_path / "merged")
  summary = merge.main([a, b, "--weight", "0.5", "--out", out,
                        "--only", "mlp/down_proj/kernel$"])
  assert summary["merged"] == CFG.num_hidden_layers
  got, want_a, want_b = _leaves(out), _leaves(a), _leaves(b)
  for name in got:
    if "down_proj" in name:
      np.testing.assert_allclose(got[name], (want_a[name] + want_b[name]) / 2,
                                 rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(got[name], want_a[name])


def test_bfloat16_parents_and_workdirs(tmp_path):
  # A workdir means its hf_export/, as init_from reads it.
  a = _folder(tmp_path / "run_a" / "hf_export", 0, dtype=jnp.bfloat16)
  b = _folder(tmp_path / "run_b" / "hf_export", 1, dtype=jnp.bfloat16)
  for weight in (0.0, 0.5):
    out = str(tmp_path / f"merged_{weight}")
    merge.main([str(tmp_path / "run_a"), str(tmp_path / "run_b"),
                "--weight", str(weight), "--out", out])
    assert merge.stored_dtype(out) == "bfloat16"
    got, want_a, want_b = _leaves(out), _leaves(a), _leaves(b)
    for name in got:
      if weight == 0:
        np.testing.assert_array_equal(got[name], want_a[name])
      else:  # mixed in float32, rounded once to bfloat16
        want = np.asarray(jnp.asarray((want_a[name] + want_b[name]) / 2,
                                      jnp.float32).astype(jnp.bfloat16),
                          np.float64)
        np.testing.assert_array_equal(got[name], want)


def test_merge_params_is_a_pure_function_on_trees():
  a = init_params(CFG, jax.random.key(0))
  b = init_params(CFG, jax.random.key(1))
  for weight, want in ((0.0, a), (1.0, b)):
    jax.tree.map(np.testing.assert_array_equal,
                 merge.merge_params(a, b, weight), want)
  half = merge.merge_params(a, b, 0.5)
  jax.tree.map(lambda h, x, y: np.testing.assert_allclose(
      h, (np.asarray(x, np.float64) + y) / 2, rtol=1e-6, atol=1e-7), half, a, b)
  other = init_params(tiny_config(intermediate_size=96), jax.random.key(1))
  with pytest.raises(merge.MergeError, match="different parameters: "
                     "layers/0/mlp/down_proj/kernel is"):
    merge.merge_params(a, other, 0.5)
  with pytest.raises(merge.MergeError, match="must be in"):
    merge.merge_params(a, b, 1.5)


def test_cli_refuses_in_one_line_with_exit_code_2(parents, tmp_path, capsys):
  a, _ = parents
  deeper = _folder(tmp_path / "deeper", 2, cfg=tiny_config(num_hidden_layers=3))
  # Weights of a wider MLP under A's config.json: the shapes give it away.
  lying = _folder(tmp_path / "lying", 3, cfg=tiny_config(intermediate_size=96))
  shutil.copyfile(os.path.join(a, "config.json"),
                  os.path.join(lying, "config.json"))
  out = str(tmp_path / "out")
  cases = {
      (a, deeper, "--weight", "0.5"):
          "different architectures (num_hidden_layers 2 vs 3)",
      (a, a, "--weight", "0.5", "--only", "no_such_tensor"):
          "matches no parameter",
      (a, str(tmp_path / "missing"), "--weight", "0.5"): "no config.json",
      (a, a, "--weight", "-0.1"): "must be in [0, 1]",
      (a, a, "--weight", "0.5", "--out", a): "is A's folder",
      (a, lying, "--weight", "0.5"): "has shape",
  }
  for args, message in cases.items():
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
      merge.main([*args, "--out", out] if "--out" not in args else list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, args
    assert len(lines) == 1 and message in lines[0], (args, lines)
    assert not os.path.exists(out)
  # The same, as a user's shell sees it.
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.merge", a, deeper, "--weight", "0.5",
       "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: A and B have different architectures "
                                 "(num_hidden_layers 2 vs 3)")
