"""Benchmark scripts: the FLOP count by hand, and the JSON they promise."""

import json
import os
import subprocess
import sys

import jax
import pytest

from bfpo_jax import trainable
from bfpo_jax.model import MistralConfig, abstract_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import mfu  # noqa: E402


def test_step_flops_by_hand():
  cfg = MistralConfig.tiny(vocab_size=100, tie_word_embeddings=False)
  params = abstract_params(cfg)
  mask = trainable.trainable_mask(params, "selective")
  d, f, layers, v = 64, 128, 2, 100
  kv = 2 * 16  # 2 kv heads x head dim 16
  per_layer = d * d + 2 * d * kv + d * d + 3 * d * f
  n = layers * per_layer + d * v
  n_train = layers * f * d
  pairs, t = 3, 10
  tokens = 2 * pairs * t
  attention = 4 * layers * t * d * tokens
  forward = 2 * n * tokens + attention
  expected = 2 * forward + 2 * n * tokens + 2 * n_train * tokens + 2 * attention
  assert mfu.matmul_params(cfg, params) == n
  assert mfu.step_flops(cfg, params, mask, pairs, t) == expected
  assert mfu.peak_flops(jax.devices()[0]) is None  # no table entry for CPUs


@pytest.mark.slow
def test_step_throughput_writes_side_by_side_json(tmp_path):
  out = tmp_path / "t.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/step_throughput.py", "--json", str(out),
       "--warmup", "1", "--reps", "1", "--hidden_size", "32",
       "--intermediate_size", "64", "--num_hidden_layers", "1",
       "--num_attention_heads", "4", "--num_key_value_heads", "2",
       "--vocab_size", "512", "--seq_len", "32", "--prompt_len", "8"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in ("jax_tokens_per_s", "torch_tokens_per_s", "ratio", "shape",
              "jax_peak_rss_mib", "torch_peak_rss_mib"):
    assert key in result
  assert abs(result["ratio"] - result["jax_tokens_per_s"]
             / result["torch_tokens_per_s"]) < 1e-9
