"""Orbax checkpoints of a run: what changes, plus where the data stream is.

A checkpoint holds the step, the trainable leaves (or LoRA adapters) and the
optimizer state, and a JSON sidecar with the data iterator state and run
counters. Frozen weights and the reference copy are not saved: they are
rebuilt from the run's model source, which never changes, so a 7B selective
run checkpoints ~2 GB of down_proj masters and moments instead of the model.

There is no RNG state to save: after initialisation (LoRA's A from the
config seed) training draws no random numbers, and the data order is a pure
function of the seed and the iterator position.

All processes call :meth:`Checkpointer.save` and :meth:`restore` together;
each writes/reads its own shards.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from bfpo_jax.train_step import TrainState


class Checkpointer:
  """Async saves every N steps, keep-last-K, restore of the latest."""

  def __init__(self, directory: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True))

  @property
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, state: TrainState, meta: dict, *, force=False):
    """Saves at ``state.step`` (asynchronously unless ``force``)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    items = {"step": state.step, "trainable": state.trainable,
             "opt_state": state.opt_state}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)),
        force=True)
    if force:
      self.manager.wait_until_finished()

  def restore(self, state: TrainState):
    """``(state, meta)`` from the latest checkpoint into ``state``'s layout.

    ``state`` supplies shapes, dtypes and shardings (and the frozen and
    reference trees, which checkpoints do not hold).
    """
    step = self.latest_step
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"step": state.step, "trainable": state.trainable,
         "opt_state": state.opt_state})
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    items = restored["state"]
    state = state._replace(step=items["step"], trainable=items["trainable"],
                           opt_state=items["opt_state"])
    return state, restored["meta"]

  def fingerprint(self) -> dict:
    """The ``fingerprint`` stored with the latest checkpoint ({} if none)."""
    restored = self.manager.restore(self.latest_step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return restored["meta"].get("fingerprint", {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
