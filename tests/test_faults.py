"""Runs that survive anything: kills, damaged checkpoints, full disks, a
second run on the same workdir; checked against an uninterrupted run."""

import glob
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from bfpo_jax import workdir as wd
from bfpo_jax.checkpoint import Checkpointer, RestoreError, SaveError
from bfpo_jax.train_step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# The workdir lock
# --------------------------------------------------------------------------- #


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  first, second = wd.WorkdirLock(str(tmp_path)), wd.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(wd.WorkdirError) as e:
    second.acquire()
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
  assert "\n" not in str(e.value)
  first.release()
  second.acquire()  # free again once released
  second.release()


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("has_flock", [True, False])
def test_a_lock_left_by_a_dead_process_is_stale(tmp_path, monkeypatch,
                                                has_flock):
  if not has_flock:  # as on filesystems without flock: the pid decides
    def no_flock(*_):
      raise OSError(37, "No locks available")
    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
  lock_file = tmp_path / wd.LOCK_FILE
  holder = {"host": socket.gethostname(), "started": "earlier"}
  lock_file.write_text(json.dumps(dict(holder, pid=_dead_pid())))
  lock = wd.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  lock.release()
  if not has_flock:  # a live holder on this host is respected
    lock_file.write_text(json.dumps(dict(holder, pid=os.getppid())))
    with pytest.raises(wd.WorkdirError, match=f"pid {os.getppid()} "):
      lock.acquire()


def test_an_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(wd.WorkdirError, match="cannot be written"):
    wd.WorkdirLock(str(tmp_path / "file" / "run")).acquire()


# --------------------------------------------------------------------------- #
# metrics.jsonl
# --------------------------------------------------------------------------- #


def _lines(*records):
  return "".join(json.dumps(r) + "\n" for r in records)


def test_trim_keeps_the_restored_steps_and_drops_a_torn_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write(_lines({"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                   {"step": 2, "eval/loss": 2.5}, {"step": 3, "loss": 1.0}))
    f.write('{"step": 4, "lo')
  notes = wd.trim_metrics(path, 2)
  with open(path) as f:
    assert [json.loads(line) for line in f] == [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
        {"step": 2, "eval/loss": 2.5}]
  assert any("torn last line" in n for n in notes)
  assert any("1 line(s) of steps after 2" in n for n in notes)
  assert wd.trim_metrics(path, 0)  # a fresh start keeps nothing
  assert os.path.getsize(path) == 0


def test_nonfinite_values_are_written_as_null():
  line = wd.json_record({"step": 3, "loss": float("inf"), "x": float("nan"),
                         "y": 1.5})

  def refuse(name):
    raise AssertionError(f"{name} is not JSON")
  assert json.loads(line, parse_constant=refuse) == {
      "step": 3, "loss": None, "x": None, "y": 1.5}


# --------------------------------------------------------------------------- #
# Empty data sources
# --------------------------------------------------------------------------- #


def test_an_empty_source_is_refused_unless_allowed():
  from bfpo_jax.build import empty_sources
  from bfpo_jax.data.sources import DataError
  from configs import tiny

  report = {"ultrafeedback:a": {"rows_read": 9, "rows_used": 9,
                                "rows_skipped": {}},
            "pku_saferlhf:b": {"rows_read": 2, "rows_used": 0,
                               "rows_skipped": {"missing_field": 2}}}
  config = tiny.get_config()
  with pytest.raises(DataError, match=r"pku_saferlhf:b \(2 rows read, 2 "
                     r"skipped\): no usable rows"):
    empty_sources(config, report)
  config.data.allow_empty_sources = True
  assert empty_sources(config, report) == [
      "warning: empty data source pku_saferlhf:b (2 rows read, 2 skipped); "
      "training on the others"]


def test_an_allowed_empty_source_leaves_the_others_weights():
  from bfpo_jax.data import pipeline

  a, b = [{"src": 0}] * 10, [{"src": 1}] * 10
  ds = pipeline.examples_dataset([a, [], b], seed=0, mixture="weighted",
                                 weights=[3.0, 5.0, 1.0])
  share = np.mean([ds[k]["src"] for k in range(400)])
  assert 0.2 <= share <= 0.3  # 1 / (3 + 1), not 5 / (3 + 5)


# --------------------------------------------------------------------------- #
# Checkpoints: fallback and failed saves
# --------------------------------------------------------------------------- #


def _state(step, offset=0.0):
  w = {"w": jax.random.normal(jax.random.key(0), (256, 256)) + offset}
  return TrainState(step=jnp.array(step, jnp.int32), trainable=w, frozen={},
                    reference=None, opt_state=optax.adam(1e-3).init(w))


def _truncate_largest_file(folder):
  files = [f for f in glob.glob(f"{folder}/**", recursive=True)
           if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def test_the_newest_checkpoint_that_reads_cleanly_is_restored(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=3)
  for step in (1, 2, 3):
    ckpt.save(_state(step, offset=step), {"at": step}, force=True)
  ckpt.close()
  _truncate_largest_file(f"{directory}/3")
  os.remove(f"{directory}/2/meta/metadata")

  ckpt = Checkpointer(directory, keep=3)
  state, meta, notes = ckpt.restore(_state(0))
  assert int(state.step) == 1 and meta == {"at": 1}
  np.testing.assert_array_equal(state.trainable["w"], _state(0, 1.0).trainable["w"])
  assert [n.split(":")[0] for n in notes] == ["skipped checkpoint 3",
                                              "skipped checkpoint 2"]
  assert all("moved to" in n and "\n" not in n for n in notes)
  assert sorted(os.listdir(directory)) == ["1", "2.damaged", "3.damaged"]
  ckpt.save(_state(2, offset=2.0), {"at": 2}, force=True)  # saved anew
  assert ckpt.latest_step == 2
  ckpt.close()


def test_no_readable_checkpoint_is_one_line(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(_state(1), {}, force=True)
  ckpt.close()
  _truncate_largest_file(f"{directory}/1")
  with pytest.raises(RestoreError) as e:
    Checkpointer(directory, keep=3).restore(_state(0))
  assert "no checkpoint" in str(e.value) and "step 1" in str(e.value)
  assert "\n" not in str(e.value)
  assert os.listdir(directory) == ["1"]  # nothing moved when none reads


def test_a_failed_background_save_is_reported_at_the_next_check(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  ckpt.save(_state(1), {}, force=True)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  # Files of at most 64 KiB: every write of the 256 KiB arrays fails, as on
  # a full disk (Python ignores SIGXFSZ, so writes fail with EFBIG).
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
  try:
    ckpt.save(_state(2), {})  # returns while the write runs
    with pytest.raises(SaveError) as e:
      ckpt.check()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(e.value)
  assert message.startswith("saving checkpoint 2 in ")
  assert "File too large" in message and "\n" not in message
  assert message.endswith("the last good checkpoint is step 1")


# --------------------------------------------------------------------------- #
# End to end on the tiny config
# --------------------------------------------------------------------------- #

FLAGS = ["--config=configs/tiny.py", "--config.max_steps=12",
         "--config.data.max_length=64", "--config.data.max_prompt_length=32",
         "--config.data.buckets=(64,)", "--config.checkpoint_every_steps=3",
         "--config.eval_every_steps=6", "--config.keep_checkpoints=3"]
# Wall-clock figures; everything else a step logs is a pure function of it.
TIMINGS = ("tokens_per_s", "data_s", "step_s")


def _start(workdir, *extra, env=None):
  cmd = [sys.executable, "-m", "bfpo_jax.train", *FLAGS, f"--workdir={workdir}",
         *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, code=0):
  """``(all output, last line of stderr)`` of a run that exits with ``code``."""
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == code, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  return out + err, (err.strip().splitlines() or [""])[-1]


def _wait_for(condition, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.005)


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.communicate()


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _has(workdir, step, kind="loss"):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return any(r["step"] == step and kind in r
               for r in map(json.loads, f.read().splitlines()))


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@pytest.mark.slow
def test_metrics_are_exact_after_kills_full_disk_and_damage(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  whole = str(tmp_path / "whole")
  text, _ = _finish(_start(whole, env=env))
  # The run below resumes from step 6: its restored data iterator must run
  # on into the main stream's second epoch (and the buffer's, 48 / 8 = 6).
  per_epoch = int(re.search(r"^steps: 12 \((\d+) per epoch\)", text, re.M)[1])
  assert 6 < per_epoch < 12, per_epoch
  expected = _comparable(_records(whole))
  kinds = [(r["step"], "eval/loss" in r) for r in expected]
  assert kinds == [(s, False) for s in range(1, 7)] + [(6, True)] + [
      (s, False) for s in range(7, 13)] + [(12, True)]

  run = str(tmp_path / "run")
  checkpoints = os.path.join(run, "checkpoints")
  flags = ["--config.export_hf=False"]

  # 1. A second run on a held workdir is refused, naming the holder. Then a
  # kill before the first checkpoint: the next run starts afresh.
  proc = _start(run, *flags, env=env)
  lock = os.path.join(run, wd.LOCK_FILE)
  _wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock), proc,
            "the lock")
  proc.send_signal(signal.SIGSTOP)  # hold it, busy or not, while we knock
  _, last = _finish(_start(run, *flags, env=env), code=2)
  assert last.startswith(f"error: workdir {run} is in use by pid {proc.pid} "
                         f"on host {socket.gethostname()}"), last
  proc.send_signal(signal.SIGCONT)
  _wait_for(lambda: _has(run, 2), proc, "step 2")
  _kill(proc)
  assert not glob.glob(os.path.join(checkpoints, "[0-9]*"))

  # 2. Killed just after checkpoint 6 commits: its train and eval lines
  # are already written.
  proc = _start(run, *flags, env=env)
  _wait_for(lambda: os.path.isdir(os.path.join(checkpoints, "6")), proc,
            "checkpoint 6")
  _kill(proc)
  assert _has(run, 6) and _has(run, 6, "eval/loss")

  # 3. The disk fills up (files over 1 MB fail) before checkpoint 9: the run
  # stops at that save, before step 10's line, naming the last good one.
  proc = _start(run, *flags, env=env)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
  _, last = _finish(proc, code=1)
  assert last.startswith("error: saving checkpoint 9 in "), last
  assert "File too large" in last
  assert last.endswith("the last good checkpoint is step 6"), last
  assert _records(run)[-1]["step"] == 9

  # 4. Killed while checkpoint 12 is being written.
  proc = _start(run, *flags, env=env)
  _wait_for(lambda: glob.glob(os.path.join(checkpoints, "12.orbax-checkpoint-tmp*")),
            proc, "checkpoint 12 to start")
  proc.send_signal(signal.SIGSTOP)
  _kill(proc)
  assert not os.path.exists(os.path.join(checkpoints, "12"))
  assert os.path.isdir(os.path.join(checkpoints, "9"))

  # 5. Then the newest checkpoint (9) is damaged and the last line torn.
  _truncate_largest_file(os.path.join(checkpoints, "9", "state"))
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write('{"step": 13, "sta')
  text, _ = _finish(_start(run, *flags, env=env))
  assert "skipped checkpoint 9:" in text
  assert "resumed from checkpoint at step 6" in text
  assert "dropped a torn last line" in text

  got = _comparable(_records(run))
  assert [(r["step"], "eval/loss" in r) for r in got] == kinds
  assert got == expected  # every step once, the values of the whole run

  # The latest checkpoint exports without the config (kept in the workdir),
  # to the weights the uninterrupted run exported.
  export = subprocess.run(
      [sys.executable, "-m", "bfpo_jax.train", "--export_only",
       f"--workdir={run}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert export.returncode == 0, export.stderr[-3000:]
  assert "exported step 12" in export.stdout
  ours = load_file(os.path.join(run, "hf_export", "model.safetensors"))
  theirs = load_file(os.path.join(whole, "hf_export", "model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name])
