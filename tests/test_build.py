"""build: config -> StepConfig, step counts and the global batch."""

import jax
import numpy as np

from bfpo_jax import build, sharding
from bfpo_jax.config import default_config


def _examples(*sizes):
  return build.Examples(task="preference", train=[[{}] * n for n in sizes],
                        held_out=[], buffer=[], report={}, pad_id=0)


def test_step_config_carries_the_config_and_the_stage_defaults():
  c = default_config()
  c.stage, c.loss.alpha, c.loss.chunk_size = "ipo", 0.3, 64
  c.trainable.lora_alpha, c.trainable.lora_rank = 32.0, 8
  c.batch.accumulation, c.data.buffer_weight = 3, 0.5
  s = build.step_config(c)
  assert (s.stage, s.alpha, s.chunk_size, s.accumulation_steps) == (
      "ipo", 0.3, 64, 3)
  assert s.beta == 0.1 and s.average_logps is True  # IPO's defaults
  assert s.lora_scale == 4.0 and s.buffer_weight == 0.5


def test_steps_count_whole_global_batches_over_all_sources():
  c = default_config()
  c.batch.global_size, c.num_epochs = 8, 3
  examples = _examples(13, 20)  # 33 pairs -> 4 full batches per epoch
  assert build.steps_per_epoch(c, examples) == 4
  assert build.total_steps(c, examples) == 12
  c.max_steps = 5
  assert build.total_steps(c, examples) == 5
  c.max_steps, c.num_epochs = 0, 1
  assert build.total_steps(c, _examples(3)) == 1  # at least one step


def test_global_batch_keeps_the_rows_and_shards_over_the_batch_axes():
  mesh = sharding.make_mesh(1, -1, 1)
  local = {"ids": np.arange(12, dtype=np.int32).reshape(4, 3)}
  batch = build.global_batch(local, mesh)
  assert batch["ids"].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(jax.device_get(batch["ids"]), local["ids"])
