"""The CLI's training loop, in process: no implicit host/device transfers."""

import json
import os

import jax
import pytest

from bfpo_jax import build, train
from bfpo_jax.checkpoint import Checkpointer
from bfpo_jax.config import validate
from bfpo_jax.workdir import Logger
from configs import tiny
from tests import helpers


@pytest.mark.parametrize("stage", ["sft", "bfpo"])
def test_the_loop_makes_no_implicit_transfers(tmp_path, stage):
  config = tiny.get_config(stage)
  config.max_steps, config.eval_every_steps = 3, 2
  config.checkpoint_every_steps = 2
  validate(config, jax.device_count())
  workdir = str(tmp_path)
  run = build.setup(config, workdir)  # setup may copy implicitly; the loop not
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  log = Logger(workdir, stage, run.steps, 0, None, None)
  loop = train.Loop(run, ckpt, log, iter(run.data.train.to_iter_dataset()))
  # Every step, metrics line, eval and checkpoint save of the loop runs under
  # the guard (nanodo and big_vision train this way).
  with helpers.no_implicit_transfers():
    status = loop.train()
  ckpt.close()
  log.close()
  assert status == "finished"
  assert sorted(ckpt.manager.all_steps()) == [2, 3]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
  assert [m["step"] for m in lines if "eval/loss" in m] == [2, 3]
