"""A LoRA run as someone coming from transformers, PEFT and W&B runs it: the
base model named by its Hub id (offline, from the cache), W&B offline, no
PyTorch installed. One run, then what it leaves behind, each checked against
the tool that reads it."""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers
from huggingface_hub import ModelCard

from bfpo_jax.model import load_hf
from tests.helpers import fill_hub_cache, hf_base_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "tester/tiny-mistral"
FLAGS = ["--config.max_steps=4", "--config.data.max_length=64",
         "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
         "--config.eval_every_steps=2", "--config.checkpoint_every_steps=4",
         f"--config.model.hf_path={REPO}", "--config.tokenizer=",
         "--config.trainable.mode=lora", "--config.trainable.lora_rank=4",
         r"--config.trainable.pattern=(q_proj|v_proj|down_proj)/kernel$"]
# The runtime environment has no PyTorch (only the tests install it).
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
                 "runpy.run_module('bfpo_jax.train', run_name='__main__', "
                 "alter_sys=True)")


def train(workdir, *flags, env):
  """The training CLI without PyTorch; stdout and stderr as one stream."""
  return subprocess.run(
      [sys.executable, "-c", WITHOUT_TORCH, "--config=configs/tiny.py",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora_run")
  base = hf_base_folder(tmp / "tiny-mistral")
  fill_hub_cache(tmp / "hub", REPO, base)
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             HF_HUB_CACHE=str(tmp / "hub"), HF_HOME=str(tmp / "hf_home"),
             WANDB_MODE="offline")
  workdir = str(tmp / "run")
  proc = train(workdir, *FLAGS, "--config.logging.wandb=True", env=env)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return {"base": base, "workdir": workdir, "out": proc.stdout, "env": env,
          "tmp": tmp}


def _logits(model, ids):
  with torch.no_grad():
    return model.eval()(torch.tensor(ids)).logits.numpy()


IDS = [[1, 523, 28766, 1838, 28766, 28767, 13, 22557, 28808, 2]]


@pytest.mark.slow
def test_startup_output_is_clean_and_the_summary_comes_first(run):
  out = run["out"]
  lines = out.split("\n")
  assert lines[0].startswith("devices: 1 x cpu"), out[:2000]
  assert "PyTorch" not in out and "warn" not in out.lower(), out[:3000]
  summary_end = next(i for i, line in enumerate(lines)
                     if line.startswith("steps: "))
  # Every summary line stands alone, before the progress bar draws anything.
  assert all("\r" not in line for line in lines[:summary_end + 1]), out[:3000]
  assert "loss: bfpo, beta 0.1, alpha 0.5, b1 3; log-probs summed" in out
  assert "wandb: run run (offline, in " in out
  assert out.rstrip().endswith(f"workdir {run['workdir']}")


@pytest.mark.slow
def test_the_peft_adapter_loads_in_peft_as_the_merged_export(run):
  folder = os.path.join(run["workdir"], "peft_adapter")
  config = peft.LoraConfig.from_pretrained(folder)
  assert config.base_model_name_or_path == REPO
  assert set(config.target_modules) == {"q_proj", "v_proj", "down_proj"}
  assert (config.r, config.lora_alpha) == (4, 32.0)
  adapted = peft.PeftModel.from_pretrained(
      transformers.MistralForCausalLM.from_pretrained(run["base"]), folder)
  merged = transformers.MistralForCausalLM.from_pretrained(
      os.path.join(run["workdir"], "hf_export"))
  theirs = _logits(adapted, IDS)
  np.testing.assert_allclose(theirs, _logits(merged, IDS), atol=1e-4)
  base = transformers.MistralForCausalLM.from_pretrained(run["base"])
  assert np.abs(theirs - _logits(base, IDS)).max() > 1e-3  # it trained


@pytest.mark.slow
def test_the_model_cards_record_the_run(run):
  summary = json.load(open(os.path.join(run["workdir"], "summary.json")))
  card = ModelCard.load(os.path.join(run["workdir"], "hf_export", "README.md"))
  assert card.data.base_model == REPO
  assert card.data.library_name == "transformers"
  assert {"bfpo", "lora"} <= set(card.data.tags)
  assert "| steps | 4 of 4 |" in card.text
  for name in ("loss", "rewards/accuracy", "rewards/accuracy/safe_safe"):
    assert f"| {name} | {summary['eval'][name]:.6g} |" in card.text
  report = json.load(open(os.path.join(run["workdir"], "data_report.json")))
  train = report[next(k for k in report if k.startswith("pku_saferlhf"))]
  assert f"| train | {train['pairs']} | {train['eval']} |" in card.text
  adapter_card = ModelCard.load(os.path.join(run["workdir"], "peft_adapter",
                                             "README.md"))
  assert adapter_card.data.library_name == "peft"
  assert adapter_card.data.base_model == REPO


def _wandb_history(run_file):
  """History rows of an offline W&B run file (a LevelDB-style log of
  protobuf records, 32 KiB blocks, after a 7-byte header)."""
  from wandb.proto import wandb_internal_pb2

  data = open(run_file, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, pending, rows = 7, 32768, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or its last piece
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      if record.WhichOneof("record_type") == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item})
  return rows


@pytest.mark.slow
def test_wandb_offline_logged_what_metrics_jsonl_holds(run):
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  files = glob.glob(os.path.join(run["workdir"], "wandb", "offline-run-*",
                                 "run-*.wandb"))
  assert len(files) == 1, files
  rows = [{k: v for k, v in row.items() if not k.startswith("_")}
          for row in _wandb_history(files[0])]
  assert len(rows) == len(records) == 6  # 4 train lines, 2 eval lines
  for row, record in zip(rows, records):
    record.pop("stage")
    assert row.keys() == record.keys()
    np.testing.assert_allclose([row[k] for k in record],
                               [record[k] for k in record], rtol=1e-6)
  run_id = open(os.path.join(run["workdir"], "wandb_run_id")).read()
  assert files[0].endswith(f"run-{run_id}.wandb")


@pytest.mark.slow
def test_a_peft_folder_starts_a_lora_run_from_its_adapters(run):
  """The adapters of the first run continue here, and the policy they give
  is also the reference: with learning rate 0 every reward margin is 0 and
  the export is the first run's."""
  workdir = str(run["tmp"] / "from_peft")
  flags = [f for f in FLAGS if "trainable.pattern" not in f
           and "lora_rank" not in f and "max_steps" not in f]
  proc = train(workdir, *flags, "--config.max_steps=1",
               "--config.optimizer.learning_rate=0", "--config.init_from="
               + os.path.join(run["workdir"], "peft_adapter"), env=run["env"])
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "LoRA from the PEFT adapter" in proc.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  margins = [v for r in records for k, v in r.items() if "margins" in k]
  assert margins and all(m == 0 for m in margins)
  first = load_hf(os.path.join(run["workdir"], "hf_export"))[1]
  second = load_hf(os.path.join(workdir, "hf_export"))[1]
  for a, b in zip(jax_leaves(first), jax_leaves(second)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]
