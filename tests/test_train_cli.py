"""The training CLI end to end on the tiny config, as a user runs it.

The SFT and BFPO runs of the stage test are made once per test run
(``helpers.tiny_run``); the chain, eight-device, precomputed-reference and
resume tests start from them or compare with them instead of running them
again. The bitwise resume after a kill is tests/test_faults.py's."""

import json
import os
import re
import shutil
import signal
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bfpo_jax.model import apply
from bfpo_jax.model.hf_io import load_hf
from tests.helpers import FAST, MULTIHOST, eight_device_run, tiny_run
from tests.helpers import train_cli as _cli

LOSS_LINES = {
    "sft": "loss: sft, token negative log-likelihood",
    "bfpo": "loss: bfpo, beta 0.1, alpha 0.5, b1 3; log-probs summed over "
            "response tokens",
    "dpo": "loss: dpo, beta 0.1, label_smoothing 0; log-probs summed over "
           "response tokens",
    "ipo": "loss: ipo, beta 0.1; log-probs averaged over response tokens"}


def _strict(name):
  raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=_strict) for line in f]


def _train_losses(workdir):
  return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "bfpo", "dpo", "ipo"])
def test_each_stage_runs_and_writes_what_a_person_sees(tmp_path_factory,
                                                       stage):
  workdir, stdout, stderr = tiny_run(tmp_path_factory, stage)
  assert "devices: 1 x cpu" in stderr + stdout
  # dpo and ipo leave beta unset in configs/tiny.py: TRL's 0.1, and IPO
  # averages its log-probs.
  assert LOSS_LINES[stage] in stdout, stdout[:3000]
  records = _metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(r["stage"] == stage and np.isfinite(r["loss"]) for r in train)
  # Timing: the batch fetch is a part of the wall time between steps.
  assert all(0 <= r["data_s"] < r["step_s"] for r in train[1:])
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [3, 6]  # each step once
  if stage != "sft":
    assert "eval/rewards/accuracy/safe_unsafe" in evals[-1]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  report = json.load(open(os.path.join(workdir, "data_report.json")))
  assert all(v["rows_read"] > 0 for v in report.values())
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["status"] == "finished" and summary["step"] == 6


@pytest.mark.slow
def test_sft_then_bfpo_chain_and_export_loads_in_transformers(
    tmp_path, tmp_path_factory):
  sft = tiny_run(tmp_path_factory, "sft")[0]
  bfpo = str(tmp_path / "bfpo")
  proc = _cli(bfpo, *FAST, f"--config.init_from={sft}",
              "--config.trainable.mode=selective")
  assert proc.returncode == 0, proc.stderr[-3000:]
  sft_cfg, sft_params = load_hf(os.path.join(sft, "hf_export"))
  cfg, params = load_hf(os.path.join(bfpo, "hf_export"))
  # Selective BFPO changed only down_proj of the SFT model it started from.
  for name in ("embed_tokens", "norm"):
    np.testing.assert_array_equal(jax_tree_first(params[name]),
                                  jax_tree_first(sft_params[name]))
  assert not np.array_equal(params["layers"][0]["mlp"]["down_proj"]["kernel"],
                            sft_params["layers"][0]["mlp"]["down_proj"]["kernel"])
  hf = transformers.MistralForCausalLM.from_pretrained(
      os.path.join(bfpo, "hf_export"), attn_implementation="eager").eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(bfpo, "hf_export"))
  ids = np.array([[1] + tok("<|user|>\nHello", add_special_tokens=False).input_ids])
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(apply(cfg, params, jnp.asarray(ids)), theirs,
                             atol=1e-4)


def jax_tree_first(tree):
  while isinstance(tree, dict):
    tree = next(iter(tree.values()))
  return np.asarray(tree)


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.05)


LONG = ["--config.max_steps=40", "--config.data.max_length=64",
        "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
        "--config.eval_every_steps=0", "--config.checkpoint_every_steps=4",
        "--config.export_hf=False"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "term")
  proc = _cli(workdir, *LONG, wait=False)
  _wait_for_checkpoint(workdir, 4, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["status"] == "stopped by SIGTERM"
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert saved[-1] == summary["step"] >= 4


@pytest.mark.slow
def test_eight_fake_devices_match_one_device(tmp_path, tmp_path_factory):
  # Eight: test_multihost's one-process run, a data 2 x fsdp 4 mesh with a
  # pair per device; one: the same run with its 8 pairs on one device.
  eight, stdout, stderr = eight_device_run(tmp_path_factory)
  assert "devices: 8 x cpu" in stderr + stdout
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in stdout
  one = str(tmp_path / "one")
  single = {"--config.batch.per_device=1": "--config.batch.per_device=8",
            "--config.mesh.data=2": "--config.mesh.data=1",
            "--config.mesh.fsdp=4": "--config.mesh.fsdp=1"}
  proc = _cli(one, *[single.get(f, f) for f in MULTIHOST],
              "--config.eval_every_steps=0", "--config.export_hf=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices: 1 x cpu" in proc.stderr + proc.stdout
  a, b = _train_losses(one), _train_losses(eight)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)],
                             rtol=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--config.batch.global_size=10"], "batch: global_size (10) must equal"),
    (["--config.mesh.fsdp=3"], "mesh: "),
    (["--config.init_from=/no/such/run"], "init_from: model folder"),
    (["--config.stage=ppo"], "stage: 'ppo'"),
    (["--config.data.sources=('nonsense:x',)"], "data.sources"),
    (["--config.model.remat_policy=some"], "model.remat_policy: 'some'"),
    (["--config.loss.beta=0"], "loss.beta: 0.0 must be positive"),
])
def test_bad_configs_fail_fast_with_one_line(tmp_path, flags, message):
  proc = _cli(str(tmp_path / "bad"), *flags)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,values,message", [
    ("loss.beta", [0.0, -0.1, float("nan")], "must be positive"),
    ("loss.b1", [1.0], "b3 = 1/(b1 - 1) undefined"),
    ("loss.label_smoothing", [-0.1, 0.7], "is not in [0, 0.5]"),
    ("optimizer.learning_rate", [-1e-5], "must be >= 0"),
])
def test_values_that_cannot_work_are_refused(field, values, message):
  from bfpo_jax.config import ConfigError, validate
  from configs import tiny

  for value in values:
    config = tiny.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ")) as e:
      validate(config, 1)
    assert message in str(e.value)
  config = tiny.get_config("dpo")
  config.loss.b1 = 1.0  # b1 only enters the BFPO target
  validate(config, 1)


@pytest.mark.parametrize("flag,message", [
    ("--config.no_such_field=1", "unknown config field 'no_such_field'"),
    ("--config.loss.betaa=1",
     "unknown config field 'betaa'; did you mean 'beta'?"),
    ("--config.lossx.beta=1", "unknown config field 'lossx'; did you mean 'loss'?"),
])
def test_unknown_config_key_is_rejected(tmp_path, flag, message):
  proc = _cli(str(tmp_path / "bad"), flag)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last == f"error: bad command line: {message}", proc.stderr[-2000:]


def _one_line_error(proc, *parts):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), last
  for part in parts:
    assert part in last, last
  return last


def test_a_pickle_only_model_folder_is_one_line(tmp_path):
  folder = tmp_path / "torch_model"
  transformers.MistralConfig(
      vocab_size=32000, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2).save_pretrained(folder)
  (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
  proc = _cli(str(tmp_path / "run"), f"--config.model.hf_path={folder}")
  _one_line_error(proc, "model.hf_path: ", "pytorch_model", "safe_serialization")


def test_an_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  proc = _cli(str(tmp_path / "file" / "run"))
  _one_line_error(proc, "cannot be written")


def test_a_run_workdir_without_export_is_one_line_offering_export(tmp_path):
  earlier = tmp_path / "earlier"
  (earlier / "checkpoints" / "30").mkdir(parents=True)
  proc = _cli(str(tmp_path / "run"), f"--config.init_from={earlier}")
  _one_line_error(proc, "a run workdir with checkpoints but no hf_export",
                  f"python -m bfpo_jax.train --export_only --workdir {earlier}")


def test_an_empty_source_among_real_ones_is_refused(tmp_path):
  empty = tmp_path / "pku_empty.jsonl"
  empty.write_text("")
  from configs import tiny

  sources = list(tiny.get_config().data.sources) + [f"pku_saferlhf:{empty}"]
  proc = _cli(str(tmp_path / "run"), f"--config.data.sources={tuple(sources)}")
  _one_line_error(proc, f"pku_saferlhf:{empty} (0 rows read", "no usable rows",
                  "data.allow_empty_sources=True")


@pytest.mark.slow
def test_nonfinite_losses_stop_the_run_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  proc = _cli(workdir, *FAST, "--config.optimizer.learning_rate=1e30",
              "--config.optimizer.warmup_ratio=0",
              "--config.optimizer.schedule=constant",
              "--config.max_consecutive_nonfinite=2", "--config.max_steps=12")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  found = re.search(r"2 non-finite steps in a row at step (\d+); checkpoint "
                    r"saved at step (\d+)$", last)
  assert found, last
  stopped, saved = map(int, found.groups())
  assert str(saved) in os.listdir(os.path.join(workdir, "checkpoints"))
  # Every step up to the checkpoint has its line (the step dispatched when
  # the run stopped included); _metrics refuses Infinity and NaN.
  records = _metrics(workdir)
  assert [m["step"] for m in records] == list(range(1, saved + 1))
  assert stopped <= saved <= stopped + 1
  assert [m["nonfinite"] for m in records[stopped - 2:stopped]] == [1.0, 1.0]


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(tmp_path, tmp_path_factory):
  workdir = str(tmp_path / "run")  # a copy of the stage test's finished run
  shutil.copytree(tiny_run(tmp_path_factory, "bfpo")[0], workdir)
  before = [(m["step"], "eval/loss" in m) for m in _metrics(workdir)]
  flags = [*FAST, "--config.export_hf=False"]
  proc = _cli(workdir, *flags, "--config.trainable.mode=selective")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert "holds checkpoints of a different run (trainable changed)" in last
  # A changed learning rate is allowed, with a warning kept in the workdir.
  proc = _cli(workdir, *flags, "--config.optimizer.learning_rate=0.002")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("warning: resuming with changed settings: optimizer.learning_rate "
          "0.001 -> 0.002") in proc.stdout + proc.stderr
  with open(os.path.join(workdir, "resume_changes.jsonl")) as f:
    change = json.loads(f.read())
  assert change["step"] == 6
  assert change["changes"] == {"optimizer.learning_rate": [0.001, 0.002]}
  # Resumed at the end: nothing is redone, nothing written twice.
  assert before == [(1, False), (2, False), (3, False), (3, True), (4, False),
                    (5, False), (6, False), (6, True)]
  assert [(m["step"], "eval/loss" in m) for m in _metrics(workdir)] == before


@pytest.mark.slow
def test_precomputed_reference_matches_and_is_cached(tmp_path,
                                                    tmp_path_factory):
  # With an eval only at the last step (6), as the stage test's run has one.
  flags = [*FAST, "--config.eval_every_steps=0", "--config.export_hf=False"]
  plain = tiny_run(tmp_path_factory, "bfpo")[0]
  cached = str(tmp_path / "cached")
  proc = _cli(cached, *flags, "--config.loss.precompute_reference=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "reference log-probs: precomputed" in proc.stderr + proc.stdout
  assert os.path.isfile(os.path.join(cached, "reference_logps.npz"))
  a, b = _train_losses(plain), _train_losses(cached)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)],
                             rtol=1e-4)
  evals = [m for m in _metrics(cached) if "eval/loss" in m]
  plain_evals = [m for m in _metrics(plain) if "eval/loss" in m]
  assert evals[-1]["step"] == plain_evals[-1]["step"] == 6
  np.testing.assert_allclose(evals[-1]["eval/loss"], plain_evals[-1]["eval/loss"],
                             rtol=1e-4)
  # A restart reads them back (it resumes at the end: no step to redo).
  again = _cli(cached, *flags, "--config.loss.precompute_reference=True")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "reference log-probs: from cache" in again.stderr + again.stdout
