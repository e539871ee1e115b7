"""Orbax checkpoints of a run: what changes, plus where the data stream is.

A checkpoint holds the step, the trainable leaves (or LoRA adapters) and the
optimizer state, and a JSON sidecar with the data iterator state and run
counters. Frozen weights and the reference copy are not saved: they are
rebuilt from the run's model source, which never changes, so a 7B selective
run checkpoints ~2 GB of down_proj masters and moments instead of the model.

There is no RNG state to save: after initialisation (LoRA's A from the
config seed) training draws no random numbers, and the data order is a pure
function of the seed and the iterator position.

Saves run in the background; :meth:`Checkpointer.check` waits for the last
one and raises :class:`SaveError` (naming the last good checkpoint) if it
failed, so a full disk stops the run at the save that hit it. On start,
:meth:`Checkpointer.restore` takes the newest checkpoint that reads cleanly
and moves newer, damaged ones aside (``<step>.damaged``).

All processes call :meth:`Checkpointer.save`, :meth:`check` and
:meth:`restore` together; each writes/reads its own shards, and they agree
on every outcome before acting on it.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp

from bfpo_jax import distributed
from bfpo_jax.train_step import TrainState


class SaveError(RuntimeError):
  """A checkpoint could not be written; the message names the last good one."""


class RestoreError(RuntimeError):
  """Checkpoints exist, but none of them reads cleanly."""


def brief(error: BaseException) -> str:
  """One line for an orbax/TensorStore error (theirs run to kilobytes): the
  OS reason when there is one, else the message without TensorStore's specs.
  """
  text = " ".join(str(error).split()) or type(error).__name__
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    item = re.search(r'Error (writing|reading) "([^"]+)"', text)
    where = f" ({item.group(1)} {item.group(2)})" if item else ""
    return f"{os.strerror(int(code.group(1)))} [errno {code.group(1)}]{where}"
  text = re.split(r" See full TensorStore details| \[source locations| "
                  r"\[tensorstore_spec| \{|\{\"", text)[0]
  return text if len(text) <= 240 else text[:237] + "..."


def _through_orbax(exc_info) -> bool:
  tb = exc_info[2] if exc_info else None
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _OrbaxErrorTracebacks(logging.Filter):
  """Orbax (and asyncio, for orbax's futures) log a failed save or restore
  with its traceback; the run reports the failure in one line instead."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and (
        f"{os.sep}orbax{os.sep}" in record.pathname
        or _through_orbax(record.exc_info)))


def _unraisable(unraisable):
  # Orbax's futures of a failed save or restore end up here when collected
  # (and its writer threads post to an event loop already closed); the
  # failure itself is reported in one line.
  if not (str(unraisable.exc_value) == "Event loop is closed" or _through_orbax(
      (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))):
    sys.__unraisablehook__(unraisable)


def quiet_orbax_tracebacks(handler: logging.Handler) -> None:
  """Keeps orbax's tracebacks of failures off ``handler`` and off the
  unraisable-exception hook: :class:`SaveError` and :class:`RestoreError`
  say what failed in one line."""
  handler.addFilter(_OrbaxErrorTracebacks())
  sys.unraisablehook = _unraisable


class Checkpointer:
  """Async saves, keep-last-K, restore of the newest good one. When to save
  is the loop's choice (``train.itstime``)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True))
    self.last_good = self.manager.latest_step()
    self._unchecked = None  # step of a save not yet known to have finished

  @property
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, meta: dict, *, force=False):
    """Saves at ``state.step`` (in the background unless ``force``).

    Raises:
      SaveError: this save, or the previous one, failed.
    """
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.check()
    items = {"step": state.step, "trainable": state.trainable,
             "opt_state": state.opt_state}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # noqa: BLE001 -- any write failure is reported
      self._failed(step, e)
    self._unchecked = step
    if force:
      self.check()

  def check(self):
    """Waits for the last save; raises :class:`SaveError` if it failed on
    any process."""
    if self._unchecked is None:
      return
    step, self._unchecked = self._unchecked, None
    error = None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 -- any write failure is reported
      error = e
    if not distributed.all_agree(error is None):
      self._failed(step, error)
    self.last_good = step

  def _failed(self, step, error):
    reason = brief(error) if error is not None else "failed on another process"
    last = (f"the last good checkpoint is step {self.last_good}"
            if self.last_good is not None else "there is no good checkpoint yet")
    raise SaveError(f"saving checkpoint {step} in {self.directory} failed: "
                    f"{reason}; {last}")

  def _abstract(self, state: TrainState):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"step": state.step, "trainable": state.trainable,
         "opt_state": state.opt_state})

  def _meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, state: TrainState, check_meta=None):
    """``(state, meta, notes)`` from the newest checkpoint that reads cleanly.

    ``state`` supplies shapes, dtypes and shardings (and the frozen and
    reference trees, which checkpoints do not hold). Checkpoints are tried
    newest first; ``check_meta(meta)`` may raise to refuse a checkpoint of a
    different run, which stops the search (that is not damage). Newer
    checkpoints that did not read are moved aside to ``<step>.damaged``, so
    the run saves those steps again; ``notes`` says which and why.

    Returns:
      ``None`` if there is no checkpoint.

    Raises:
      RestoreError: there are checkpoints, but none reads cleanly.
    """
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason, restored = None, None
      try:
        meta = self._meta(step)
      except Exception as e:  # noqa: BLE001 -- damage takes many forms
        reason = f"metadata unreadable: {brief(e)}"
      if reason is None and check_meta is not None:
        check_meta(meta)
      if reason is None:
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(self._abstract(state))))["state"]
        except Exception as e:  # noqa: BLE001 -- damage takes many forms
          reason = f"state unreadable: {brief(e)}"
      if distributed.all_agree(reason is None):
        notes = self._move_aside(skipped)
        self.last_good = step
        state = state._replace(step=restored["step"],
                               trainable=restored["trainable"],
                               opt_state=restored["opt_state"])
        return state, meta, notes
      skipped.append((step, reason or "unreadable on another process"))
    if not skipped:
      return None
    step, reason = skipped[0]
    raise RestoreError(
        f"no checkpoint in {self.directory} reads cleanly (newest, step "
        f"{step}: {reason}); move the folder aside to start over")

  def _move_aside(self, skipped) -> list[str]:
    notes = []
    for step, reason in skipped:
      target = os.path.join(self.directory, f"{step}.damaged")
      n = 1
      while os.path.exists(target):
        n += 1
        target = os.path.join(self.directory, f"{step}.damaged.{n}")
      if jax.process_index() == 0:
        os.rename(os.path.join(self.directory, str(step)), target)
      notes.append(f"skipped checkpoint {step}: {reason} (moved to {target})")
    if skipped:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bfpo_jax: damaged checkpoints")
      self.manager.reload()
    return notes

  def fingerprint(self) -> dict:
    """The ``fingerprint`` stored with the latest checkpoint ({} if none)."""
    return self._meta(self.latest_step).get("fingerprint", {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.check()
    self.manager.close()
