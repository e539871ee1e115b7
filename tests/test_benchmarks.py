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

import collectives  # noqa: E402
import mfu  # noqa: E402
import profiling  # noqa: E402


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
       "--vocab_size", "512", "--seq_len", "32", "--prompt_len", "8",
       "--profile", str(tmp_path / "profile")],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in ("jax_tokens_per_s", "torch_tokens_per_s", "ratio", "shape",
              "jax_peak_rss_mib", "torch_peak_rss_mib"):
    assert key in result
  assert abs(result["ratio"] - result["jax_tokens_per_s"]
             / result["torch_tokens_per_s"]) < 1e-9
  # --profile: the traced steps' op time by phase and component (one
  # layer whose down_proj trains: the backward reaches its mlp, not attention).
  summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
  parts = {(p["phase"], p["component"]) for p in summary["parts"]}
  for part in [("policy forward", "logps"), ("reference forward", "logps"),
               ("policy forward", "mlp"), ("backward", "mlp")]:
    assert part in parts
  assert abs(sum(p["share"] for p in summary["parts"]) - 1) < 1e-6


@pytest.mark.slow
def test_step_throughput_on_a_model_folder_with_lora(tmp_path):
  """``--model DIR --mode lora``: both sides on the folder's weights, LoRA
  with the adapters-off reference; the same last-step loss on both."""
  from tests.test_model_llama import _save_random_llama

  _save_random_llama(str(tmp_path / "m"), num_key_value_heads=2)
  out = tmp_path / "t.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/step_throughput.py", "--json", str(out),
       "--warmup", "1", "--reps", "1", "--model", str(tmp_path / "m"),
       "--mode", "lora", "--seq_len", "32", "--prompt_len", "8",
       "--chunk_size", "16"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["mode"] == "lora" and result["shape"]["vocab_size"] == 128
  assert result["jax_loss"] == pytest.approx(result["torch_loss"], rel=1e-4)


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %ag = bf16[4,8]{1,0} all-gather(%x), dimensions={0}, metadata={op_name="jit(step)/jvp(policy)/mlp/dot_general"}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ag)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main () -> f32[] {
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = f32[16]{0} all-reduce(%g), to_apply=%add, metadata={op_name="jit(step)/transpose(jvp(policy))/attention/dot_general"}
  %rs = f32[2,2]{1,0} reduce-scatter(%h), dimensions={0}, metadata={op_name="jit(step)/optimizer/add"}
  ROOT %r = f32[] constant(0)
}
"""  # noqa: E501 (HLO lines are long)


def test_collective_bytes_by_hand():
  out = collectives.collective_bytes(HLO)
  # all-gather: 4*8 bf16 = 64 B, three loop trips; all-reduce 16 f32 = 64 B;
  # reduce-scatter 4 f32 = 16 B.
  assert out["by_kind"] == {"all-gather": 192, "all-reduce": 64,
                            "reduce-scatter": 16}
  assert out["total_bytes"] == 272
  assert out["by_part"] == {"policy forward/mlp": 192, "backward/attention": 64,
                            "optimizer/other": 16}


def test_classify_reads_scopes_and_transforms():
  assert profiling.classify("jit(train_step)/jvp(reference)/logps/while/body/"
                            "dot_general") == ("reference forward", "logps")
  assert profiling.classify(
      "jit(train_step)/while/body/closed_call/transpose(jvp(policy))/"
      "jvp(policy)/checkpoint/rematted_computation/mlp/dot_general") == (
          "remat recompute", "mlp")
  assert profiling.classify("jit(train_step)/optimizer/mul") == ("optimizer",
                                                                  "other")
  assert profiling.classify("reduce_sum") == ("other", "other")


def test_self_times_subtract_nested_ops():
  events = [{"ts": 0, "dur": 10}, {"ts": 1, "dur": 3}, {"ts": 5, "dur": 4},
            {"ts": 6, "dur": 1}, {"ts": 20, "dur": 2}]
  assert profiling.self_times(events) == {0: 3, 1: 3, 2: 3, 3: 1, 4: 2}


@pytest.mark.slow
def test_collectives_of_the_a100x4_step_gather_weights_not_activations(tmp_path):
  # The tiny architecture under the a100x4 config's fsdp=4 mesh: rows stay on
  # their device, so nothing activation- or logits-sized is all-reduced (the
  # session-1 step all-reduced ~24 GiB per step here: [chunk, 32000] logits
  # and [16, 1024, 128] MLP activations).
  out = tmp_path / "c.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/collectives.py", "--preset", "tiny",
       "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert result["by_kind"].get("all-reduce", 0) < 2**20
  assert 0 < result["total_bytes"] < 2**27


@pytest.mark.slow
def test_eval_throughput_writes_side_by_side_json(tmp_path):
  out = tmp_path / "e.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/eval_throughput.py", "--json", str(out),
       "--questions", "2", "--documents", "1", "--prompts", "2",
       "--max_gen_toks", "4", "--max_length", "128"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["requests"] == {"loglikelihood": 8, "loglikelihood_rolling": 1,
                                "generate_until": 2}
  for backend in ("hf", "bfpo_jax", "bfpo_jax_bucketed"):
    kinds = result[backend]["per_kind"]
    n = sum(k["requests"] for k in kinds.values())
    warm = sum(k["warm_s"] for k in kinds.values())
    assert abs(result[backend]["warm_requests_per_s"] - n / warm) < 1e-9
  ratio = result["ratio_bfpo_jax_to_hf"]
  assert abs(ratio["warm"] - result["bfpo_jax"]["warm_requests_per_s"]
             / result["hf"]["warm_requests_per_s"]) < 1e-9


@pytest.mark.slow
def test_packing_benchmark_writes_its_json(tmp_path):
  out = tmp_path / "p.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/packing.py", "--json", str(out), "--steps",
       "1", "--pairs", "2", "--hidden_size", "32", "--intermediate_size", "64",
       "--num_hidden_layers", "1", "--num_attention_heads", "4",
       "--num_key_value_heads", "2", "--vocab_size", "512"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in ("padded_pairs_per_s", "packed_pairs_per_s", "ratio",
              "padded_padding_share", "packed_padding_share", "distribution",
              "projection_a100x4_bfpo_stage"):
    assert key in result
  assert result["ratio"] == pytest.approx(result["packed_pairs_per_s"]
                                          / result["padded_pairs_per_s"])
  layouts = result["layouts"]
  assert {"padded_1024", "padded_a100x4", "padded_best", "packed"} <= set(layouts)
  # Packing leaves less padding than any padded layout of the same pairs.
  assert all(layouts["packed"]["padding_share"] < v["padding_share"]
             for k, v in layouts.items() if k != "packed")
  # The 1024-token projection is the one BENCHMARKS.md derives by hand.
  assert result["projection_a100x4_bfpo_stage"]["padded_1024"]["flops"] == 5.97e18
