"""Multi-process start-up: JAX's multi-controller runtime, one call.

Each process runs the same command. On SLURM and TPU pods the coordinator,
process count and index come from the environment; elsewhere they come from
``--coordinator_address``, ``--num_processes`` and ``--process_id``. On CPUs
(tests, laptops) collectives go through gloo.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np


class DistributedError(RuntimeError):
  """Start-up failed; the message says what to check."""


def auto_detected() -> str | None:
  """The cluster environment JAX can initialise from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    return "tpu"
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               *, timeout_s=300):
  """Joins the job's processes; a no-op for a single process.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: how many processes the job has.
    process_id: this process's index, 0 <= process_id < num_processes.
    timeout_s: give up (with :class:`DistributedError`) after this long
      instead of waiting forever for peers that will not come.
  """
  explicit = coordinator_address is not None
  if not explicit and auto_detected() is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise DistributedError("--num_processes/--process_id need "
                             "--coordinator_address")
    return
  if explicit:
    if num_processes is None or process_id is None:
      raise DistributedError("--coordinator_address needs --num_processes and "
                             "--process_id")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id {process_id} is not in "
                             f"[0, {num_processes})")
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = coordinator_address or auto_detected()
  hint = ("check the coordinator address, the process count and that every "
          "process was started")

  def give_up():
    # JAX's coordination client aborts the process (C++ LOG(FATAL)) when its
    # deadline passes; say what is wrong in one line and exit first.
    print(f"error: could not join {num_processes or 'the'} processes at "
          f"{where} within {timeout_s}s: {hint}", file=sys.stderr, flush=True)
    os._exit(2)

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + 60)
  except Exception as e:  # XlaRuntimeError / RuntimeError: report, not trace
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f"could not join {num_processes or 'the'} processes "
                           f"at {where}: {first[:300]} ({hint})") from None
  finally:
    watchdog.cancel()


def all_agree(ok: bool) -> bool:
  """True if ``ok`` holds on every process (one small all-gather).

  Used where one process can fail alone (its own checkpoint shards, its
  own disk) and the others must take the same branch instead of waiting
  forever in the next collective.
  """
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32),
                                           tiled=True)
  return bool(np.all(flags))
