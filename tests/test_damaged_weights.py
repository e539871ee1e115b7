"""A damaged weights file stops train, evaluate and convert with one line
naming the file and exit code 2, before anything heavy runs."""

import os
import subprocess
import sys

import jax
import pytest

from bfpo_jax.model import MistralConfig, init_params, save_hf
from bfpo_jax.tokenizer import load_tokenizer
from tests.helpers import ROOT


def _damage(path, how):
  weights = os.path.join(path, "model.safetensors")
  data = open(weights, "rb").read()
  content = {"truncated": data[:len(data) // 2],
             "empty_header": b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
             "empty_file": b""}[how]
  with open(weights, "wb") as f:
    f.write(content)
  return weights


@pytest.fixture
def damaged(request, tmp_path):
  cfg = MistralConfig.tiny(num_hidden_layers=1)
  save_hf(str(tmp_path), cfg, init_params(cfg, jax.random.key(0)))
  load_tokenizer().save_pretrained(str(tmp_path))
  return str(tmp_path), _damage(str(tmp_path), request.param)


def _one_line_error(cmd, weights):
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and weights in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  return errors[0]


@pytest.mark.parametrize("damaged", ["truncated", "empty_header"],
                         indirect=True)
def test_train_stops_in_one_line(damaged, tmp_path):
  folder, weights = damaged
  line = _one_line_error(
      [sys.executable, "-m", "bfpo_jax.train", "--config", "configs/tiny.py",
       "--workdir", str(tmp_path / "run"), f"--config.model.hf_path={folder}",
       "--config.max_steps=1"], weights)
  assert "damaged safetensors file" in line
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("damaged", ["empty_file"], indirect=True)
def test_evaluate_stops_in_one_line(damaged, tmp_path):
  folder, weights = damaged
  _one_line_error([sys.executable, "-m", "bfpo_jax.evaluate", "--model",
                   folder, "--tasks", "bfpo_tiny_ppl", "--include_path",
                   os.path.join(ROOT, "tests", "eval_tasks"), "--out",
                   str(tmp_path / "eval")], weights)
  assert not os.path.exists(tmp_path / "eval")
