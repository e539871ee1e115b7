"""Several processes on one CPU (gloo): the path SLURM and TPU pods take."""

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from bfpo_jax.data import pipeline
from tests.helpers import EIGHT_DEVICES, MULTIHOST, MULTIHOST_BUCKETS, eight_device_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two buckets (88, 128) that split the tiny pairs' lengths (66-98 tokens): in
# this data order the two processes' own longest rows fall in different
# buckets (checked by test_this_data_order_splits_the_processes_buckets).
BUCKETS = MULTIHOST_BUCKETS
FLAGS = ["--config=configs/tiny.py", *MULTIHOST]


def _losses(workdir, key="loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


@pytest.fixture(scope="module")
def tiny_examples():
  from bfpo_jax import build
  from configs import tiny

  config = tiny.get_config()
  config.batch.update(global_size=8, per_device=1, accumulation=1)
  config.data.buckets = BUCKETS
  return config, build.load_examples(config, build.tokenizer_for(config))


def test_this_data_order_splits_the_processes_buckets(tiny_examples):
  # The precondition of the two-process test below: padding each process's
  # rows to its own longest row would give the processes different shapes.
  config, examples = tiny_examples
  stream = pipeline.examples_dataset(examples.train, seed=config.seed)
  buckets = list(config.data.buckets)
  own = [[pipeline.bucket_length(
      max(pipeline.example_length(stream[k * 8 + j]) for j in range(p, 8, 2)),
      buckets) for p in (0, 1)] for k in range(6)]
  assert any(a != b for a, b in own), own


def test_processes_pad_every_batch_to_one_length(tiny_examples):
  config, examples = tiny_examples
  make = functools.partial(pipeline.batches, examples.train, task="preference",
                           global_batch=8, seed=config.seed,
                           buckets=list(config.data.buckets), pad_id=0)
  whole, shares = make(), [make(process_index=p, process_count=2) for p in (0, 1)]
  for k in range(6):
    a, b = shares[0][k], shares[1][k]
    for key, value in whole[k].items():
      assert a[key].shape[1:] == b[key].shape[1:] == value.shape[1:], key
      # The shares interleave back into the one-process batch.
      np.testing.assert_array_equal(np.stack([a[key], b[key]], 1).reshape(
          value.shape), value)


def _single(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **EIGHT_DEVICES)
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
def test_two_processes_match_one_and_resume_across_layouts(tmp_path,
                                                           tmp_path_factory):
  one = eight_device_run(tmp_path_factory)[0]  # what _single(one) runs
  expected = _losses(one)
  two = str(tmp_path / "two")
  proc = _multi(two)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices: 8 x cpu (2 process(es))" in proc.stderr + proc.stdout
  got = _losses(two)
  assert sorted(got) == list(range(1, 7))
  # rtol 1e-4: gloo sums the gradient in another order than one process
  # does, and Adam at the tiny config's lr 1e-3 carries the float32 rounding
  # into later losses (2.6e-5 seen at step 5; step 1 agrees to 1e-7).
  np.testing.assert_allclose([got[k] for k in range(1, 7)],
                             [expected[k] for k in range(1, 7)], rtol=1e-4)
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
  evals, expected_evals = _losses(two, "eval/loss"), _losses(one, "eval/loss")
  assert sorted(evals) == sorted(expected_evals) == [3, 6]
  np.testing.assert_allclose([evals[k] for k in (3, 6)],
                             [expected_evals[k] for k in (3, 6)], rtol=1e-4)
  assert os.path.isfile(os.path.join(two, "hf_export", "model.safetensors"))

  # Drop the final checkpoint: the next run resumes from the 2-process
  # checkpoint at step 3, in a 1-process layout, and redoes steps 4-6.
  shutil.rmtree(os.path.join(two, "checkpoints", "6"))
  resumed = _single(two)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step 3" in resumed.stderr + resumed.stdout
  again = _losses(two)
  np.testing.assert_allclose([again[k] for k in range(4, 7)],
                             [expected[k] for k in range(4, 7)], rtol=1e-4)


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
