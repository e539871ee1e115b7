"""Checkpointer: exact round trip, the save schedule (itstime) and keep-last-K."""

import jax.numpy as jnp
import numpy as np

from bfpo_jax.checkpoint import Checkpointer
from bfpo_jax.train import itstime
from bfpo_jax.train_step import TrainState


def _state(step, value):
  return TrainState(step=jnp.asarray(step, jnp.int32),
                    trainable={"w": jnp.full((3, 2), value, jnp.float32)},
                    frozen={"v": jnp.ones((2,), jnp.float32)},
                    reference=None,
                    opt_state={"mu": jnp.full((3, 2), -value, jnp.float32)})


def test_restore_returns_the_saved_leaves_and_meta(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(_state(2, 1.5), {"counters": {"a": 1}}, force=True)
  ckpt.close()
  state, meta, notes = Checkpointer(str(tmp_path), keep=2).restore(_state(0, 0.0))
  assert int(state.step) == 2 and meta == {"counters": {"a": 1}} and notes == []
  np.testing.assert_array_equal(state.trainable["w"], np.full((3, 2), 1.5))
  np.testing.assert_array_equal(state.opt_state["mu"], np.full((3, 2), -1.5))
  np.testing.assert_array_equal(state.frozen["v"], 1.0)  # not in checkpoints


def test_itstime_and_the_newest_k_are_kept(tmp_path):
  assert [s for s in range(1, 11) if itstime(s, 3, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 6) if itstime(s, 0, 5)] == [5]  # 0: only the end
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step in (3, 6, 9):
    ckpt.save(_state(step, float(step)), {}, force=True)
  ckpt.close()
  assert sorted(ckpt.manager.all_steps()) == [6, 9]
  state, _, _ = ckpt.restore(_state(0, 0.0))
  assert int(state.step) == 9 and float(state.trainable["w"][0, 0]) == 9.0


def test_no_checkpoint_restores_none(tmp_path):
  assert Checkpointer(str(tmp_path), keep=1).restore(
      _state(0, 0.0)) is None
