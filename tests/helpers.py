"""Shared by tests: tiny models, random batches in the step's layout, the
notebook runner, and two ways to pay for an expensive run once (a JAX
compilation cache, a run made once per test run)."""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from bfpo_jax.model import MistralConfig

VOCAB = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def no_implicit_transfers():
  """Context for a training loop: every host/device copy must be explicit
  (``device_put``/``device_get``), as big_vision runs with
  ``jax_transfer_guard="disallow"``; an implicit one raises."""
  return jax.transfer_guard("disallow")


def tiny_config(**overrides):
  fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False,
                sliding_window=None)
  fields.update(overrides)
  return MistralConfig.tiny(**fields)


def _sequences(rng, n, length, prompt_lens, response_lens):
  ids = np.zeros((n, length), np.int32)
  attention = np.zeros((n, length), bool)
  loss = np.zeros((n, length), bool)
  for i in range(n):
    p, r = prompt_lens[i], response_lens[i]
    ids[i, : p + r] = rng.integers(3, VOCAB, p + r)
    attention[i, : p + r] = True
    loss[i, p : p + r] = True
  return ids, attention, loss


def preference_batch(seed, pairs=8, length=12):
  """Right-padded pairs sharing each prompt, with mixed safety flags."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, 5, pairs)
  batch = {}
  for side in ("chosen", "rejected"):
    response = rng.integers(2, length - 5, pairs)
    ids, attention, loss = _sequences(rng, pairs, length, prompt, response)
    if side == "rejected":  # same prompt tokens as the chosen sequence
      for i in range(pairs):
        ids[i, : prompt[i]] = batch["chosen_input_ids"][i, : prompt[i]]
    batch[f"{side}_input_ids"] = ids
    batch[f"{side}_attention_mask"] = attention
    batch[f"{side}_loss_mask"] = loss
  batch["chosen_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  batch["rejected_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  batch["weight"] = np.ones(pairs, np.float32)
  return batch


def sft_batch(seed, rows=8, length=12):
  rng = np.random.default_rng(seed)
  ids, attention, loss = _sequences(rng, rows, length, rng.integers(2, 5, rows),
                                    rng.integers(2, length - 5, rows))
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_base_folder(path, seed=0, **overrides):
  """A random tiny MistralForCausalLM saved by transformers (safetensors),
  with the bundled Mistral-7B tokenizer: a stand-in for a Hub model."""
  import torch
  import transformers

  from bfpo_jax.tokenizer import load_tokenizer

  fields = dict(vocab_size=32000, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False,
                sliding_window=None)
  fields.update(overrides)
  torch.manual_seed(seed)
  transformers.MistralForCausalLM(transformers.MistralConfig(**fields)) \
      .save_pretrained(path)
  load_tokenizer().save_pretrained(path)
  return str(path)


def fill_hub_cache(cache_dir, repo_id, folder, commit=HUB_COMMIT, ref="main"):
  """Lays ``folder``'s files out in a Hugging Face Hub cache as what a
  download of ``repo_id`` at ``commit`` (branch ``ref``) leaves there: blobs,
  a snapshot of links to them, and the ref. Returns the snapshot folder."""
  import hashlib
  import os
  import shutil

  repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(repo, "snapshots", commit)
  os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  os.makedirs(snapshot, exist_ok=True)
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      blob = os.path.join(repo, "blobs", hashlib.sha256(f.read()).hexdigest())
    shutil.copyfile(os.path.join(folder, name), blob)
    os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
  with open(os.path.join(repo, "refs", ref), "w") as f:
    f.write(commit)
  return snapshot


def pairs_of(batch):
  """The tokenized pairs (``tokenize_pair``'s layout) of a padded batch."""
  pairs = []
  for i in range(len(batch["chosen_is_safe"])):
    prompt = int(np.argmax(batch["chosen_loss_mask"][i]))
    ids = {side: batch[f"{side}_input_ids"][i][
        batch[f"{side}_attention_mask"][i]].tolist()
           for side in ("chosen", "rejected")}
    pairs.append({"prompt_length": prompt, "chosen_ids": ids["chosen"],
                  "rejected_ids": ids["rejected"],
                  "chosen_is_safe": bool(batch["chosen_is_safe"][i]),
                  "rejected_is_safe": bool(batch["rejected_is_safe"][i])})
  return pairs


def compilation_cache(path):
  """Environment for CLI runs that share a JAX compilation cache at
  ``path``: later runs of one config load its compiled steps instead of
  compiling them again (tracing still runs), as SafeHelp-mini does."""
  return {"JAX_COMPILATION_CACHE_DIR": str(path),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def once_per_test_run(tmp_path_factory, name, make):
  """``make(folder)`` run once per test run, however many tests ask.

  Under pytest-xdist the workers share it: the first to ask runs it, the
  others wait on a lock and read what it left.

  Args:
    make: writes what the tests read into ``folder`` and returns a text
      (e.g. the output of the command it ran); it raises on failure, and the
      next test to ask tries again.

  Returns:
    ``(folder, text)``.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this test run
  folder, saved = root / name, root / f"{name}.out"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not saved.exists():
      shutil.rmtree(folder, ignore_errors=True)  # what a failed try left
      folder.mkdir()
      saved.write_text(make(folder))
  return folder, saved.read_text()


def notebook_script(path):
  """The code cells of a notebook as one script; shell and magic lines
  (``%pip``, ``!git``) are the user's set-up and are dropped."""
  with open(path) as f:
    cells = json.load(f)["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] == "code":
      lines += [line.rstrip("\n") for line in cell["source"]
                if not line.lstrip().startswith(("%", "!"))]
      lines.append("")
  return "\n".join(lines)


def run_notebook(name, tmp_path, **env):
  """Runs a notebook's code cells as one script on CPU; returns its stdout."""
  script = tmp_path / (os.path.splitext(name)[0] + ".py")
  script.write_text(notebook_script(os.path.join(NOTEBOOKS, name)))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env)
  proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout
