"""What a run keeps in its workdir besides checkpoints, kept exact.

* ``run.lock``: one run per workdir. The holder keeps an ``flock`` on it (the
  kernel drops it when the process dies, even by SIGKILL) and writes its host
  and pid there, so a second run is refused with one line naming the holder.
* ``metrics.jsonl``: one JSON object per step and kind (train, ``eval/``).
  On start, lines past the step the run resumes from (all of them for a fresh
  start) are dropped, as is a half-written last line; a step's lines are
  written before its checkpoint is saved. So after any kill and resume every
  step appears exactly once. Non-finite values are written as ``null``.
* ``resume_changes.jsonl``: optimisation settings that changed on a resume.
* ``wandb/`` and ``wandb_run_id`` with ``logging.wandb``: the Weights & Biases
  run gets the scalars of metrics.jsonl, against ``step``; a resumed run
  continues the same W&B run (steps redone after a kill appear twice there).

In multi-process runs process 0 holds the lock and writes these files.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import socket
import sys
import uuid

import jax

from bfpo_jax import distributed

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
CHANGES_FILE = "resume_changes.jsonl"
WANDB_ID_FILE = "wandb_run_id"


class WorkdirError(RuntimeError):
  """The workdir cannot be used: busy, or not writable (one line)."""


def _holder(text: str) -> str:
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
  except (ValueError, KeyError, TypeError):
    return "another run"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, but another user's
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run.

  ``acquire`` raises :class:`WorkdirError` naming the holder if another live
  process holds it. Where the filesystem has no ``flock`` (some network
  mounts) the file's host and pid decide: the lock is stale when that
  process is gone on this host.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> None:
    try:
      os.makedirs(self.workdir, exist_ok=True)
      f = open(self.path, "a+")
    except OSError as e:
      raise WorkdirError(f"workdir {self.workdir} cannot be written: "
                         f"{e.strerror or e}") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      has_flock = True
    except BlockingIOError:
      f.seek(0)
      holder = _holder(f.read())
      f.close()
      raise self._busy(holder) from None
    except OSError:  # no flock here: fall back on the recorded pid
      has_flock = False
    f.seek(0)
    text = f.read()
    if not has_flock and text.strip():
      try:
        info = json.loads(text)
        stale = (info["host"] == socket.gethostname()
                 and not _pid_alive(int(info["pid"])))
      except (ValueError, KeyError, TypeError):
        stale = False
      if not stale:
        f.close()
        raise self._busy(_holder(text))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    self._file = f

  def _busy(self, holder: str) -> WorkdirError:
    return WorkdirError(
        f"workdir {self.workdir} is in use by {holder}; wait for that run to "
        f"end or use another --workdir (if it is gone, delete {self.path})")

  def release(self) -> None:
    if self._file is None:
      return
    # Emptied, not deleted: deleting a locked file lets a waiting opener lock
    # the old inode while a newcomer locks a new one. Closing unlocks.
    self._file.seek(0)
    self._file.truncate()
    self._file.close()
    self._file = None


def hold(workdir) -> WorkdirLock:
  """Process 0 locks the workdir; all processes learn whether it could."""
  lock, error = WorkdirLock(workdir), None
  try:
    if jax.process_index() == 0:
      lock.acquire()
    else:
      os.makedirs(workdir, exist_ok=True)
  except WorkdirError as e:
    error = e
  except OSError as e:
    error = WorkdirError(f"workdir {workdir} cannot be written: "
                         f"{e.strerror or e}")
  if not distributed.all_agree(error is None):
    lock.release()
    raise error or WorkdirError(f"workdir {workdir}: another process of this "
                                "job cannot use it (its output says why)")
  return lock


def trim_metrics(path: str, last_step: int) -> list[str]:
  """Keeps the lines of ``path`` up to ``last_step``; returns notes.

  A line without its newline (the process died while writing it) or that is
  not JSON is dropped with a note. The file is replaced atomically, so a kill
  while trimming leaves the old file.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  lines, notes, keep = raw.split(b"\n"), [], []
  if lines[-1]:
    notes.append(f"{path}: dropped a torn last line ({len(lines[-1])} bytes, "
                 "no newline)")
  bad = later = 0
  for line in lines[:-1]:
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      bad += 1
      continue
    if step <= last_step:
      keep.append(line + b"\n")
    else:
      later += 1
  if bad:
    notes.append(f"{path}: dropped {bad} line(s) that are not JSON records")
  if later:
    notes.append(f"{path}: dropped {later} line(s) of steps after {last_step}, "
                 "which this run redoes")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  return notes


def json_record(record: dict) -> str:
  """One JSON line; NaN and infinities (not JSON) become ``null``."""
  return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v)
                     else None for k, v in record.items()}, allow_nan=False)


def record_changes(workdir: str, step: int, changes: dict) -> None:
  """Appends the settings that changed on a resume at ``step``."""
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps({
        "step": step, "changes": changes,
        "time": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")


def start_wandb(config, workdir: str, extra_config: dict | None = None):
  """A Weights & Biases run for ``logging.wandb`` (process 0), else None.

  Project, entity and run name come from ``config.logging`` (the name
  defaults to the workdir's); the run id is kept in the workdir so a resume
  continues the same run. ``WANDB_MODE=offline`` writes under
  ``workdir/wandb``. ``extra_config``: more values to record (the effective
  settings).
  """
  if not config.logging.wandb or jax.process_index() != 0:
    return None
  import wandb

  id_file = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.isfile(id_file):
    with open(id_file) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_file, "w") as f:
      f.write(run_id)
  logging = config.logging
  run = wandb.init(
      project=logging.wandb_project, entity=logging.wandb_entity or None,
      name=logging.wandb_run_name or os.path.basename(os.path.abspath(workdir)),
      id=run_id, resume="allow", dir=workdir,
      config=dict(config.to_dict(), **(extra_config or {})),
      # Silent: the start-up summary says where the run is, in one line.
      settings=wandb.Settings(console="off", silent=True))
  # The run's own step counter cannot go back after a resume; plot against
  # the training step instead.
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def summary_writer(folder):
  """tensorboardX's ``SummaryWriter`` on ``folder``, imported without torch.

  tensorboardX imports torch, when installed, only to accept torch tensors
  (2-3 s per process); the run logs floats. The import sees torch as absent
  unless something has imported it already.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide and sys.modules.get("torch", "") is None:
      del sys.modules["torch"]
  return SummaryWriter(folder)


class Logger:
  """metrics.jsonl, TensorBoard, W&B and the progress bar; process 0 only.

  Opening it trims metrics.jsonl to the lines of steps up to
  ``resumed_step`` (0: a fresh start); the dropped lines' steps are redone.
  The progress bar appears with :meth:`start_progress` (or the first step),
  so that lines printed before (the start-up summary) stand on their own.
  """

  def __init__(self, workdir, stage, total, start, resumed_step,
               wandb_run=None):
    self.stage, self.active = stage, jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.total, self.start, self.bar, self.wandb = total, start, None, wandb_run
    if not self.active:
      return
    notes = trim_metrics(self.path, resumed_step or 0)
    self.tb = summary_writer(os.path.join(workdir, "tensorboard"))
    for note in notes:
      self.info(note)

  def write(self, step, metrics, prefix=""):
    if not self.active:
      return
    record = {"step": step, "stage": self.stage}
    record.update({prefix + k: float(v) for k, v in metrics.items()})
    try:
      with open(self.path, "a") as f:
        f.write(json_record(record) + "\n")
    except OSError as e:
      raise WorkdirError(f"cannot write {self.path}: {e.strerror or e}") from None
    for k, v in record.items():
      if k not in ("step", "stage") and math.isfinite(v):
        self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in record.items() if k != "stage"})

  def sync(self):
    """Flushes metrics.jsonl to disk (before a checkpoint that covers it)."""
    if self.active and os.path.exists(self.path):
      with open(self.path, "a") as f:
        os.fsync(f.fileno())

  def start_progress(self):
    """Shows the progress bar; lines printed before stand on their own."""
    if self.active and self.bar is None:
      from tqdm import tqdm

      self.bar = tqdm(total=self.total, initial=self.start, desc=self.stage,
                      unit="step", dynamic_ncols=True)

  def stop_progress(self):
    """Closes the progress bar; later lines print below its final state."""
    if self.active and self.bar is not None:
      self.bar.close()
      self.bar = None

  def progress(self, step, metrics, tokens_per_s):
    if self.active:
      self.start_progress()
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{float(metrics['loss']):.4g}",
                           tok_s=f"{tokens_per_s:,.0f}")

  def info(self, text):
    if self.active:
      # Flushed: the bar (on stderr) must not overtake a line still buffered.
      (print if self.bar is None else self.bar.write)(text)
      sys.stdout.flush()

  def close(self):
    if self.active:
      self.stop_progress()
      self.tb.close()
      if self.wandb is not None:
        self.wandb.finish()
