"""Several processes on one CPU (gloo): the path SLURM and TPU pods take."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/tiny.py", "--config.max_steps=6",
         "--config.data.max_length=64", "--config.data.max_prompt_length=32",
         "--config.data.buckets=(64,)", "--config.eval_every_steps=0",
         "--config.checkpoint_every_steps=3", "--config.batch.per_device=1",
         "--config.batch.accumulation=1", "--config.mesh.fsdp=8"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _single(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "bfpo_jax.train", *FLAGS,
                         f"--workdir={workdir}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _multi(workdir, n=2, devices=4, extra=()):
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=os.path.dirname(workdir))
  return subprocess.run(["bash", "launch/local_multiprocess.sh", str(n),
                         str(devices), *FLAGS, *extra, f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_layouts(tmp_path):
  one = str(tmp_path / "one")
  assert _single(one).returncode == 0
  expected = _losses(one)
  two = str(tmp_path / "two")
  proc = _multi(two)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices: 8 x cpu (2 process(es))" in proc.stderr + proc.stdout
  got = _losses(two)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[k] for k in range(1, 7)],
                             [expected[k] for k in range(1, 7)], rtol=1e-5)
  assert os.path.isfile(os.path.join(two, "hf_export", "model.safetensors"))

  # Drop the final checkpoint: the next run resumes from the 2-process
  # checkpoint at step 3, in a 1-process layout, and redoes steps 4-6.
  shutil.rmtree(os.path.join(two, "checkpoints", "6"))
  resumed = _single(two)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step 3" in resumed.stderr + resumed.stdout
  again = _losses(two)
  np.testing.assert_allclose([again[k] for k in range(4, 7)],
                             [expected[k] for k in range(4, 7)], rtol=1e-5)


def test_wrong_process_count_fails_fast_with_a_message(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", *FLAGS[:1],
       f"--workdir={tmp_path}/w", "--coordinator_address=127.0.0.1:29517",
       "--num_processes=2", "--process_id=0", "--distributed_timeout=10"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: could not join 2 processes at 127.0.0.1:29517")
  assert time.time() - start < 120


def test_inconsistent_distributed_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", *FLAGS[:1],
       f"--workdir={tmp_path}/w", "--num_processes=2", "--process_id=1"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=240)
  assert proc.returncode == 2
  assert "need --coordinator_address" in proc.stderr.strip().splitlines()[-1]
