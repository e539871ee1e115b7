"""The GPU check (benchmarks/gpu_suite.sh): its pieces by hand, and the whole
script's dry run on the CPU, so it still runs when a GPU is lent."""

import json
import os
import subprocess
import sys
import time
import types
import zipfile

import jax
import numpy as np
import pytest

from bfpo_jax import sharding
from bfpo_jax.model import MistralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_checks  # noqa: E402
import gpu_suite  # noqa: E402
import mfu  # noqa: E402

PARTS = ("environment", "plan", "correctness.logits",
         "correctness.dtype_losses", "packing", "mfu.dots", "profile",
         "attention.cudnn_packed", "attention.cudnn_padded", "mfu.full",
         "attention.xla_padded")


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10", 125), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
    ("cpu", None)])
def test_peak_by_card_name_takes_variants_before_families(kind, tflops):
  # The dense bf16 figures of the vendors' datasheets (half the sparse ones).
  peak = mfu.peak_flops(types.SimpleNamespace(device_kind=kind))
  assert peak == (tflops * 1e12 if tflops else None)


def test_layers_that_fit_agree_with_the_estimate_at_each_count():
  cfg = MistralConfig.mistral_7b(dtype=np.dtype("bfloat16"),
                                 param_dtype=np.dtype("bfloat16"), remat=True,
                                 remat_policy="dots")
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}

  def estimate(layers):
    return sharding.memory_report(
        cfg.replace(num_hidden_layers=layers), sizes, pairs_per_device=5,
        pack_length=2048, layout="packed", remat_policy="dots")

  budget = 0.9 * 16 * 2**30  # a 16 GB card
  fit = mfu.layers_that_fit(estimate, budget, 32)
  assert 0 < fit < 32
  assert estimate(fit)["total"] <= budget < estimate(fit + 1)["total"]
  assert mfu.layers_that_fit(estimate, 10 * 2**40, 32) == 32  # capped
  assert mfu.layers_that_fit(estimate, 2**30, 32) == 0


def test_cudnn_attention_calls_count_fmha_custom_calls():
  hlo = """
  %a = bf16[2,8] custom-call(%q, %k), custom_call_target="__cudnn$fmhaSoftmax"
  %b = bf16[2,8] custom-call(%q), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %c = f32[2,8] custom-call(%x), custom_call_target="__cublas$gemm"
  %d = f32[2] fusion(%y), kind=kLoop, metadata={op_name="__cudnn$fmha note"}
  """
  assert mfu.cudnn_attention_calls(hlo) == 2


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batch_geometry_counts_the_pairs_tokens(layout):
  config = mfu.load_config(os.path.join(ROOT, "configs", "a100x4.py"))
  batch, geometry = mfu.make_batch(layout, config, 32000, pairs=12,
                                   seq_len=1024, rows_multiple=4)
  pairs = mfu.mixed_pairs(np.random.default_rng(0), 12, 32000, 1024, 512)
  if layout == "packed":  # each prompt once, one copy of its last token
    real = sum(len(p["chosen_ids"]) + len(p["rejected_ids"])
               - p["prompt_length"] + 1 for p in pairs)
    assert batch["input_ids"].shape == (geometry["rows"],
                                        geometry["row_length"])
    assert geometry["rows"] % 4 == 0
    assert geometry["flops_pairs"] == geometry["rows"] / 2
  else:  # both rows of a pair, the prompt twice
    real = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    assert geometry["rows"] == 24 and geometry["row_length"] in (256, 512, 1024)
  assert geometry["real_tokens"] == real and geometry["pairs"] == 12


def test_layers_rule_takes_memory_first_then_time():
  layers = gpu_suite.Layers(32, cap=0)
  assert layers.choose(100) == (32, "memory: 32 layers fit (plan)")
  layers.observe(32, 160.0)  # 5 s per layer
  count, rule = layers.choose(100)
  assert count == 16 and rule.startswith("time: 16 layers in 100 s")
  assert gpu_suite.Layers(32, cap=8).choose(100)[0] == 8
  assert gpu_suite.Layers(None, cap=0).choose(100)[0] is None


def _suite(tmp_path, budget, todo, parts=""):
  args = types.SimpleNamespace(
      out=str(tmp_path / "out"), work=str(tmp_path / "work"), dry_run=True,
      budget_s=budget, max_layers=0, parts=parts, install_status="ok",
      install_s=0.0, install_wheels=0, install_target="", install_log=None)
  os.makedirs(args.out)
  os.makedirs(args.work)
  suite = gpu_suite.Suite(args)
  suite.run(todo)
  with open(os.path.join(args.out, "gpu_suite.json")) as f:
    return json.load(f)


def _alive(pid, wait_s=5.0):
  """Whether ``pid`` still runs after ``wait_s`` (a zombie does not)."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      with open(f"/proc/{pid}/stat") as f:
        running = f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      running = False
    if not running or time.monotonic() > deadline:
      return running
    time.sleep(0.1)


def test_suite_records_each_failure_and_goes_on(tmp_path):
  figures = str(tmp_path / "f.json")
  pid_file = tmp_path / "pid"
  code = lambda text: ["-c", text]  # noqa: E731
  todo = [
      gpu_suite.Part("a", None, code(
          f"import json; json.dump({{'x': 1}}, open({figures!r}, 'w'))"), 20,
          figures),
      gpu_suite.Part("b", "crash", code("raise SystemExit('bad input here')"),
                     20),
      gpu_suite.Part("b", "hang", code(
          "import os, subprocess, sys, time\n"
          f"child = subprocess.Popen([sys.executable, '-c', 'import time; "
          f"time.sleep(60)'])\nopen({str(pid_file)!r}, 'w').write("
          "str(child.pid))\ntime.sleep(60)"), 3),
      gpu_suite.Part("c", None, code("pass"), 20),
  ]
  result = _suite(tmp_path, 60, todo, parts="a,b")
  assert result["a"]["status"] == "ok" and result["a"]["figures"] == {"x": 1}
  assert result["b"]["crash"]["status"] == "error"
  assert "bad input here" in result["b"]["crash"]["error"]
  assert result["b"]["hang"]["status"] == "timeout"
  assert not _alive(int(pid_file.read_text()))  # its own child ended with it
  assert result["c"] == {"status": "skipped", "error": "not in --parts"}
  log = (tmp_path / "out" / "gpu_suite.log").read_text()
  assert "----- b.crash output -----" in log


def test_suite_keeps_time_for_later_parts_and_skips_when_out_of_time(
    tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_suite, "MIN_LIMIT_S", 0.5)
  sleep = ["-c", "import time; time.sleep(30)"]
  todo = [gpu_suite.Part("big", None, sleep, 100, layered=True),
          gpu_suite.Part("small", None, sleep, 1),
          gpu_suite.Part("late", None, ["-c", "pass"], 1)]
  result = _suite(tmp_path / "a", 3.5, todo)
  # The layered part leaves the others their 2 s; they get them.
  assert result["big"]["limit_s"] == pytest.approx(1.5, abs=0.1)
  assert result["big"]["layers_rule"] == "plan failed: the preset's layer count"
  assert result["big"]["status"] == result["small"]["status"] == "timeout"
  assert result["small"]["limit_s"] == 1 and result["late"]["status"] == "ok"
  # A part that takes all that is left leaves nothing for the next.
  result = _suite(tmp_path / "b", 1, [gpu_suite.Part("hog", None, sleep, 10),
                                      gpu_suite.Part("next", None, sleep, 1)])
  assert result["hog"]["status"] == "timeout"
  assert result["next"]["status"] == "skipped"
  assert result["next"]["error"].startswith("out of time")


def test_suite_sh_refuses_bad_arguments_in_one_line():
  proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT,
                        capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "usage: benchmarks/gpu_suite.sh [--dry-run] OUT_DIR"


def _wheel(folder, name, requires):
  path = os.path.join(folder, f"{name}-py3-none-any.whl")
  dist = name.replace("-", "_", 1)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires))
  return path


def test_wheel_check_removes_stale_versions_and_names_what_is_missing(
    tmp_path, monkeypatch):
  (tmp_path / "list.txt").write_text(
      "# comment\nfoo-bar==1.0 foo_bar\nbaz==2.0 baz\n")
  (tmp_path / "device.txt").write_text("# device\nnumpy\nqux\n")
  listed = gpu_checks.carried(str(tmp_path / "list.txt"))
  monkeypatch.setattr(gpu_checks, "carried", lambda: listed)
  wheels = tmp_path / "w"
  wheels.mkdir()
  _wheel(wheels, "foo_bar-1.0", ["numpy>=1", "baz", "extra-thing; python_version>'3'",
                                 "pytest; extra == 'test'"])
  stale = _wheel(wheels, "foo_bar-0.9", [])
  out = gpu_checks.wheels(str(wheels), str(tmp_path / "device.txt"))
  assert out["removed"] == [os.path.basename(stale)]
  assert not os.path.exists(stale)
  assert out["missing"] == ["baz"]
  assert out["not_carried_requirements"] == {"extra-thing": ["foo_bar"]}
  assert out["error"] == "missing wheels: baz"
  assert out["total_bytes"] == out["wheel_bytes"] + out["tree_bytes"]


def _fake_smollm2(path):
  """A random tiny Llama with SmolLM2's traits (tied embeddings, no window)."""
  import torch
  import transformers

  torch.manual_seed(1)
  config = transformers.LlamaConfig(
      vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
      max_position_embeddings=128, rope_theta=100000.0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)


@pytest.mark.slow
def test_dry_run_gives_every_part_figures_or_an_error(tmp_path):
  _fake_smollm2(str(tmp_path / "smollm2"))
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable, GPU_SUITE_BUDGET_S="900",
             BFPO_SMOLLM2_DIR=str(tmp_path / "smollm2"))
  proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run",
                         str(out)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["gpu_suite.json", "gpu_suite.log"]
  result = json.loads((out / "gpu_suite.json").read_text())
  get = lambda key: result[key] if "." not in key else result[  # noqa: E731
      key.split(".")[0]][key.split(".")[1]]
  for key in PARTS:
    part = get(key)
    assert part["status"] in ("ok", "error", "timeout"), (key, part)
    assert "figures" in part or part.get("error"), (key, part)
  statuses = {key: get(key)["status"] for key in PARTS}
  # On the CPU only cuDNN's attention cannot run.
  assert statuses == {**dict.fromkeys(PARTS, "ok"),
                      "attention.cudnn_padded": "error"}, statuses
  assert "cuDNN" in get("attention.cudnn_padded")["error"]
  assert result["install"]["status"] == "ok" or result["install"][
      "status"].startswith("skipped")

  env_figures = get("environment")["figures"]
  assert env_figures["failed_imports"] == {}
  assert env_figures["versions"]["jax"] == jax.__version__
  plan = get("plan")["figures"]
  assert plan["layers"] == min(r["layers_fit"] for r in plan["runs"].values())
  assert plan["device_memory_bytes"] == 2**30  # the dry run's stated card

  for key in ("mfu.dots", "mfu.full", "attention.xla_padded"):
    f = get(key)["figures"]
    assert f["layers"] == get(key)["layers"] and f["mfu"] is None  # CPU
    assert f["tokens_per_s"] == pytest.approx(
        f["rows"] * f["seq_len"] / f["median_step_s"])
    assert f["pairs_per_s"] == pytest.approx(f["pairs"] / f["median_step_s"])
    assert f["cudnn_fmha_calls"] == 0 and f["memory"]["estimate_bytes"] > 0
  assert get("mfu.full")["figures"]["remat_policy"] == "full"
  cudnn_packed = get("attention.cudnn_packed")["figures"]
  assert cudnn_packed["attention_impl"] == "cudnn"
  assert cudnn_packed["cudnn_fmha_calls"] == 0 and "median_step_s" not in cudnn_packed

  logits = get("correctness.logits")["figures"]
  for model in ("random_mistral", "smollm2"):  # against transformers, float32
    assert logits[model]["float32_default"]["rel_err"] < 1e-5
    assert 1e-4 < logits[model]["bfloat16"]["rel_err"] < 5e-2
  losses = get("correctness.dtype_losses")["figures"]
  assert len(losses["float32"]) == len(losses["bfloat16"]) == 2
  assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=0.05)
  packing = get("packing")["figures"]
  assert packing["ratio"] == pytest.approx(packing["packed_pairs_per_s"]
                                           / packing["padded_pairs_per_s"])
  profile = get("profile")["figures"]
  assert ("policy forward", "mlp") in {(p["phase"], p["component"])
                                       for p in profile["parts"]}
  assert sum(p["share"] for p in profile["parts"]) == pytest.approx(1)
  assert result["suite"]["dry_run"] and result["suite"]["wall_s"] > 0
