"""What a resumed run must share with its checkpoints, and what may change.

A checkpoint stores :func:`resume_fingerprint` (plus :func:`state_layout`)
and :func:`resume_settings`. A resume with a different fingerprint is a
different run and is refused; changed settings are allowed, with a warning
recorded in the workdir.
"""

from __future__ import annotations

import functools
import hashlib

import jax

from bfpo_jax import build
from bfpo_jax.config import ConfigError, loss_setting
from bfpo_jax.workdir import record_changes


def resume_fingerprint(config) -> dict:
  """Config fields that a checkpoint's state and data position depend on."""
  return {"stage": config.stage, "model": build.model_source(config) or
          config.model.preset, "trainable": config.trainable.to_dict(),
          "data": list(config.data.sources), "seed": config.seed,
          "global_batch": config.batch.global_size,
          "optimizer": config.optimizer.name}


def fingerprint(config, state) -> dict:
  """:func:`resume_fingerprint` plus the state's :func:`state_layout`."""
  return dict(resume_fingerprint(config), state_layout=state_layout(state))


def resume_settings(config) -> dict:
  """Optimisation settings a resumed run may change (it warns and records)."""
  c = config
  return {"loss.beta": loss_setting(c, "beta"), "loss.alpha": c.loss.alpha,
          "loss.b1": c.loss.b1, "loss.label_smoothing": c.loss.label_smoothing,
          "optimizer.learning_rate": c.optimizer.learning_rate,
          "optimizer.schedule": c.optimizer.schedule,
          "optimizer.warmup_ratio": c.optimizer.warmup_ratio,
          "optimizer.weight_decay": c.optimizer.weight_decay,
          "optimizer.clip_norm": c.optimizer.clip_norm,
          "batch.per_device": c.batch.per_device,
          "batch.accumulation": c.batch.accumulation,
          "max_steps": c.max_steps, "num_epochs": c.num_epochs}


def changed_settings(meta, settings) -> dict:
  """``{name: [saved, now]}`` for the settings that differ from a
  checkpoint's ``meta``."""
  saved = meta.get("settings", {})
  return {k: [saved[k], v] for k, v in settings.items()
          if k in saved and saved[k] != v}


def state_layout(state) -> str:
  """A hash of the checkpointed leaves' paths, shapes and dtypes: a changed
  optimizer or trainable set is a different run, not a damaged checkpoint."""
  leaves = jax.tree_util.tree_flatten_with_path(
      {"trainable": state.trainable, "opt_state": state.opt_state})[0]
  text = "\n".join(f"{jax.tree_util.keystr(p)} {x.shape} {x.dtype}"
                   for p, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_run(expected, workdir, meta):
  """Raises ConfigError if checkpoint ``meta`` is of another run than the
  ``expected`` :func:`fingerprint`; fields a checkpoint lacks are not
  compared (older checkpoints)."""
  saved = meta.get("fingerprint", {})
  changed = [k for k in expected if k in saved and saved[k] != expected[k]]
  if changed:  # the layout says why only when no field does
    changed = [k for k in changed if k != "state_layout"] or changed
    raise ConfigError(
        f"{workdir} holds checkpoints of a different run ({', '.join(changed)} "
        "changed); use a new --workdir or the original config")


def restore(ckpt, state, iterator, config, workdir, expected=None):
  """Resumes a run from its newest checkpoint that reads cleanly.

  Refuses a checkpoint of another run (:func:`check_same_run`), moves
  damaged ones aside, puts the data ``iterator`` back where it was, and warns
  of changed :func:`resume_settings` (recorded in
  ``workdir/resume_changes.jsonl``). ``expected``: the run's
  :func:`fingerprint`, if the caller has it (else computed from ``state``).

  Returns:
    ``(state, counters, notes)``: the restored state (``state`` itself when
    there is no checkpoint), the saved non-finite counters (``None`` if
    none) and lines for the log.
  """
  restored = ckpt.restore(state, functools.partial(
      check_same_run, expected or fingerprint(config, state), workdir))
  if restored is None:
    return state, None, []
  state, meta, notes = restored
  iterator.set_state(meta["data_iterator"])
  step = int(jax.device_get(state.step))
  changed = changed_settings(meta, resume_settings(config))
  if changed:
    notes.append("warning: resuming with changed settings: " + ", ".join(
        f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        + f" (recorded in {workdir}/resume_changes.jsonl)")
    if jax.process_index() == 0:
      record_changes(workdir, step, changed)
  notes.append(f"resumed from checkpoint at step {step}")
  return state, meta["counters"], notes
