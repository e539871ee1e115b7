"""Hub ids wherever a model folder is accepted, offline from a filled cache."""

import os
import subprocess
import sys

import pytest
from huggingface_hub.utils import filter_repo_objects

from bfpo_jax import hub
from tests.helpers import HUB_COMMIT, fill_hub_cache, hf_base_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The files of mistralai/Mistral-7B-v0.1 on the Hub, and what other repos add.
MISTRAL_FILES = [
    ".gitattributes", "README.md", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json"]
OTHER_FILES = [
    "consolidated.safetensors", "original/consolidated.00.pth",
    "modeling_custom.py", "configuration_custom.py", "tf_model.h5",
    "flax_model.msgpack", "model.gguf", "adapter_model.bin",
    "adapter_model.safetensors", "adapter_config.json", "chat_template.jinja",
    "training_args.bin", "optimizer.pt"]


@pytest.mark.parametrize("name,parsed", [
    ("mistralai/Mistral-7B-v0.1", ("mistralai/Mistral-7B-v0.1", None)),
    ("HuggingFaceH4/zephyr-7b-beta@main", ("HuggingFaceH4/zephyr-7b-beta", "main")),
    (f"a-b/c.d_e@{HUB_COMMIT}", ("a-b/c.d_e", HUB_COMMIT)),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("runs/sft/hf_export", None), ("/abs/folder", None), ("./a/b", None),
    ("~/models/x", None), ("tiny", None), ("a/..", None), ("", None),
    ("configs/tiny.py", None),  # exists here: a path, never an id
])
def test_which_names_are_hub_ids(name, parsed):
  assert hub.parse_hub_id(name) == parsed


def test_only_safetensors_config_tokenizer_and_card_files_are_fetched():
  kept = set(filter_repo_objects(MISTRAL_FILES + OTHER_FILES,
                                 allow_patterns=list(hub.ALLOW_PATTERNS)))
  assert kept == {
      "README.md", "config.json", "generation_config.json",
      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "special_tokens_map.json",
      "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
      "adapter_model.safetensors", "adapter_config.json", "chat_template.jinja"}


CHECK = r"""
import sys
import huggingface_hub
import jax
import numpy as np

from bfpo_jax import build, hub, sharding
from bfpo_jax.config import validate
from bfpo_jax.evaluate import judges, loading
from bfpo_jax.model import load_hf, load_tokenizer
from configs import tiny

folder, commit = sys.argv[1:]
patterns = []
download = huggingface_hub.snapshot_download
def spy(*args, **kwargs):
  patterns.append(kwargs.get("allow_patterns"))
  return download(*args, **kwargs)
huggingface_hub.snapshot_download = spy

def same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                  jax.tree.leaves(b)))

_, want = load_hf(folder)
for name in ("tester/tiny-mistral", f"tester/tiny-mistral@{commit}"):
  assert same(load_hf(name)[1], want), name
text = "<|user|>\nHello there</s>"
assert (load_tokenizer("tester/tiny-mistral")(text).input_ids
        == load_tokenizer(folder)(text).input_ids)
mesh = sharding.make_mesh(1, -1, 1)
loaded = loading.load("tester/tiny-mistral", mesh, dtype="float32")
assert same(loaded.params, want) and loaded.source.endswith(commit)
config = tiny.get_config()
config.model.hf_path = "tester/tiny-mistral"
config.tokenizer = ""  # the model's own
validate(config, 1)
build.check_model_source(config)
assert same(build.load_model(config, mesh)[1], want)
assert build.tokenizer_for(config).name_or_path.endswith(commit)
judge = judges.make_judge("tester/tiny-mistral")  # the evaluator's judge
assert judge.path.endswith(commit) and judge.name == "classifier:tester/tiny-mistral"
assert patterns and all(p == list(hub.ALLOW_PATTERNS) for p in patterns)
try:
  judges.make_judge("nobody/nothing")
except ValueError as e:
  print("judge error:", e)
try:
  hub.resolve_model("nobody/nothing")
except hub.HubError as e:
  print("error:", e)
"""


def _offline_env(tmp_path):
  return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
              HF_HOME=str(tmp_path / "hf_home"), JAX_PLATFORMS="cpu",
              PYTHONPATH=ROOT)


def test_hub_ids_load_from_the_cache_offline_everywhere(tmp_path):
  folder = hf_base_folder(tmp_path / "tiny-mistral")
  fill_hub_cache(tmp_path / "hub", "tester/tiny-mistral", folder)
  proc = subprocess.run([sys.executable, "-c", CHECK, folder, HUB_COMMIT],
                        cwd=ROOT, env=_offline_env(tmp_path),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  judge_line, line = proc.stdout.strip().splitlines()[-2:]
  assert line.startswith("error: nobody/nothing: no such local folder; as a "
                         "Hub id it is not in the local Hugging Face cache")
  assert judge_line == f"judge error: --judge {line[len('error: '):]}"


def test_no_network_and_no_cache_is_one_line_in_the_cli(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--config.model.hf_path=nobody/nothing"],
      cwd=ROOT, env=_offline_env(tmp_path), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: model.hf_path: nobody/nothing: no such local "
                         "folder; as a Hub id it is not in the local Hugging "
                         "Face cache and the Hub cannot be reached"), last


def test_the_data_cli_says_the_same_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.data", "--tokenizer=nobody/nothing",
       "--source=pku_saferlhf:bfpo_jax/data/tiny/pku_saferlhf.jsonl"],
      cwd=ROOT, env=_offline_env(tmp_path), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().startswith("error: nobody/nothing: no such local "
                                        "folder")
