"""``--dry_run``: everything a run does before its first step, printed; no
weight read and nothing written."""

import json
import os
import re

import jax
import pytest
import transformers

from bfpo_jax import build, startup
from bfpo_jax.model import hf_io
from bfpo_jax.model.mistral import abstract_params, param_path
from configs import tiny
from tests.helpers import FAST, ROOT, tiny_run, train_cli

SUMMARY = ("devices: ", "model: ", "memory per device ", "data (pairs ",
           "loss: ", "steps: ")


def _summary(text):
  return [line for line in text.splitlines() if line.startswith(SUMMARY)]


def _mistral_params(vocab, d, mlp, layers, heads, kv_heads, head_dim, tied):
  """A Mistral's parameter count, by hand: embeddings (and an untied head),
  per layer q/o [d, heads x head_dim], k/v [d, kv_heads x head_dim], three
  MLP kernels and two norms; the final norm."""
  attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
  return (vocab * d * (1 if tied else 2) + layers * (attention + 3 * d * mlp
                                                     + 2 * d) + d)


# configs/tiny.py's preset: vocab 32000, d 64, MLP 128, 2 layers, 4 heads of
# 16, 2 kv heads, tied embeddings.
TINY_PARAMS = _mistral_params(32000, 64, 128, 2, 4, 2, 16, tied=True)


# BFPO: 43 + 22 training pairs (48 and 24 rows, 10% held out) -> 8 batches
# of 8 per epoch, 3 epochs. SFT: 43 + 43 sequences -> 10, 2 epochs.
@pytest.mark.parametrize("stage,steps", [("bfpo", "steps: 24 (8 per epoch)"),
                                         ("sft", "steps: 20 (10 per epoch)")])
def test_the_dry_run_prints_the_plan_and_writes_nothing(tmp_path, stage, steps):
  # From an empty folder, with the default workdir (runs/STAGE).
  proc = train_cli(None, "--dry_run", config=f"{ROOT}/configs/tiny.py:{stage}",
                   cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # no workdir, lock or data_report.json
  out = proc.stdout
  assert f"params {TINY_PARAMS:,}, trainable {TINY_PARAMS:,} (full)" in out
  assert steps in out
  assert "devices: 1 x cpu (1 process(es)); mesh {'data': 1, 'fsdp': 1, " \
         "'tensor': 1}" in out
  assert re.search(r"^memory per device \(estimate\): \d+\.\d\d GiB", out, re.M)
  # The data report, as python -m bfpo_jax.data prints it.
  assert re.search(r"^source +split +read +kept +used  skipped$", out, re.M)
  assert re.search(r"^    43 train examples per "
                   "epoch$", out, re.M)
  assert f"workdir: runs/{stage} (new)" in out
  assert out.rstrip().endswith("drop --dry_run to train")


def _files(folder):
  return sorted((os.path.relpath(os.path.join(d, f), folder),
                 os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(folder) for f in files)


def test_the_plan_is_what_the_run_printed_at_start_up(tmp_path_factory):
  workdir, stdout, _ = tiny_run(tmp_path_factory, "bfpo")
  before = _files(workdir)
  proc = train_cli(workdir, *FAST, "--dry_run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(_summary(stdout)) == len(SUMMARY)
  assert _summary(proc.stdout) == _summary(stdout)
  assert re.search(r"^workdir: .* holds checkpoints at steps [\d, ]*6; the run "
                   "would resume", proc.stdout, re.M), proc.stdout
  assert _files(workdir) == before  # not a file touched


@pytest.mark.parametrize("mode", ["full", "selective", "lora"])
def test_the_planned_shapes_are_the_state_the_run_builds(tmp_path, mode):
  config = tiny.get_config()
  config.trainable.mode = mode
  config.loss.precompute_reference = mode == "selective"  # no reference copy
  config.data.max_length, config.data.max_prompt_length = 64, 32
  config.data.buckets = (64,)
  run = build.setup(config, str(tmp_path))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(run.state) == shapes(run.shapes)
  assert (run.state.reference is None) == (mode != "full")


def _one_line(proc, *parts):
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for part in parts:
    assert part in lines[0], lines[0]


def _weightless_folder(folder, shard_bytes=None):
  """A model folder with config.json; with ``shard_bytes``, also an index
  naming every tensor in one shard holding those bytes."""
  transformers.MistralConfig(
      vocab_size=32000, hidden_size=64, intermediate_size=96,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
      tie_word_embeddings=False).save_pretrained(folder)
  if shard_bytes is not None:
    shard = "model-00001-of-00001.safetensors"
    names = [hf_io.hf_name(param_path(p))[0] for p, _ in
             jax.tree_util.tree_flatten_with_path(abstract_params(
                 hf_io.load_config(str(folder))))[0]]
    (folder / hf_io.INDEX_FILE).write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for name in names}}))
    (folder / shard).write_bytes(shard_bytes)
  return str(folder)


@pytest.mark.parametrize("case", ["field", "weights", "source", "export_only"])
def test_what_the_run_would_refuse_is_one_line_and_exit_2(tmp_path, case):
  flags, parts = {
      "field": (["--config.loss.beta=0"], ["loss.beta: 0.0 must be positive"]),
      "weights": ([f"--config.model.hf_path="
                   f"{_weightless_folder(tmp_path / 'model')}"],
                  ["model.hf_path: ", "no model.safetensors or "
                   "model.safetensors.index.json"]),
      "source": (["--config.data.sources=('pku_saferlhf:/no/such.jsonl',)"],
                 ["/no/such.jsonl"]),
      "export_only": (["--export_only"], ["--dry_run and --export_only"]),
  }[case]
  workdir = tmp_path / "run"
  _one_line(train_cli(str(workdir), "--dry_run", *flags), *parts)
  assert not workdir.exists()


def test_the_dry_run_reads_no_weight(tmp_path, monkeypatch):
  # A real folder; any tensor read stops with an error.
  folder = str(tmp_path / "model")
  transformers.MistralForCausalLM(transformers.MistralConfig(
      vocab_size=32000, hidden_size=64, intermediate_size=96,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
      tie_word_embeddings=False)).save_pretrained(folder)
  read = []

  def no_reading(self, name):
    read.append(name)
    raise RuntimeError(f"read {name}")

  monkeypatch.setattr(hf_io._Safetensors, "__getitem__", no_reading)
  config = tiny.get_config()
  config.model.hf_path = folder
  workdir = tmp_path / "run"
  text = startup.dry_run(config, str(workdir))
  params = _mistral_params(32000, 64, 96, 3, 4, 1, 16, tied=False)
  assert f"model: 3 layers, d=64, vocab 32000; params {params:,}" in text
  assert read == [] and not workdir.exists()
  # The run itself reads tensors (and stops at the first).
  workdir.mkdir()
  with pytest.raises(RuntimeError, match="^read "):
    build.setup(config, str(workdir))
  assert len(read) == 1


def test_the_dry_run_refuses_a_damaged_shard_in_one_line(tmp_path):
  # Its one shard is not safetensors at all: the header alone says so.
  folder = _weightless_folder(tmp_path / "model", shard_bytes=b"\0" * 64)
  config = tiny.get_config()
  config.model.hf_path = folder
  with pytest.raises(build.ConfigError, match=(
      r"^model.hf_path: .*model-00001-of-00001.safetensors: damaged "
      r"safetensors file")):
    startup.dry_run(config, str(tmp_path / "run"))
