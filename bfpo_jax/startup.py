"""What a run says before its first step: the start-up summary, and the
whole plan for ``--dry_run``.

    python -m bfpo_jax.train --config configs/tiny.py --dry_run

The dry run does everything :func:`bfpo_jax.build.plan` does (config
validation, model folder and tokenizer checks, the data report, the mesh,
the step count, the memory estimate), prints it and stops: no model weight
is read (the model is known by its shapes) and nothing is written, not even
the workdir.
"""

from __future__ import annotations

import os

import jax

from bfpo_jax import build, trainable
from bfpo_jax.config import describe_loss, validate


def summary(plan: build.Plan) -> str:
  """The lines a run prints at start-up (a :class:`~bfpo_jax.build.Run` is
  a plan too): devices and mesh, model and parameter counts, memory, data,
  loss and steps."""
  config, report = plan.config, plan.examples.report
  n_train = trainable.count_params(plan.shapes.trainable)
  total = trainable.count_params(plan.shapes.frozen) + (
      0 if config.trainable.mode == "lora" else n_train)
  memory, model_cfg = plan.memory, plan.model_cfg
  lines = [
      f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.process_count()} process(es)); mesh {dict(plan.mesh.shape)}",
      f"model: {model_cfg.num_hidden_layers} layers, d={model_cfg.hidden_size}, "
      f"vocab {model_cfg.vocab_size}; params {total:,}, trainable "
      f"{n_train:,} ({config.trainable.mode})",
      f"memory per device (estimate): {memory['total'] / 2**30:.2f} GiB "
      f"(params {memory['params_frozen'] / 2**30:.2f}, optimizer "
      f"{memory['optimizer_state'] / 2**30:.2f})",
      "data (pairs or sequences per epoch): " + "; ".join(
          f"{k}: {v['pairs']} {v['role']}"
          + (f" + {v['eval']} held out" if v["role"] == "train" else "")
          + f" ({sum(v['rows_skipped'].values())} skipped)"
          for k, v in report.items()),
      f"loss: {describe_loss(config)}",
      f"steps: {plan.steps} ({plan.steps_per_epoch} per epoch), global batch "
      f"{config.batch.global_size} = {config.batch.per_device} per device x "
      f"{config.batch.accumulation} microbatches",
  ]
  return "\n".join(lines)


def workdir_line(workdir: str) -> str:
  """What the run would find in ``workdir`` (read only)."""
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(int(name) for name in (
      os.listdir(folder) if os.path.isdir(folder) else ()) if name.isdigit())
  if steps:
    return (f"workdir: {workdir} holds checkpoints at steps "
            f"{', '.join(map(str, steps))}; the run would resume from the "
            "newest that reads cleanly, if it is of the same run")
  return f"workdir: {workdir} ({'exists' if os.path.isdir(workdir) else 'new'})"


def dry_run(config, workdir: str) -> str:
  """The plan of a run, as text: the data report table, the start-up
  summary and notes. Raises what the run would raise before its first step
  (``ConfigError``, ``DataError``, ...)."""
  from bfpo_jax.data.__main__ import format_report

  validate(config, jax.device_count())
  plan = build.plan(config)
  lines = [format_report(plan.examples.report), summary(plan), *plan.notes]
  if plan.step_cfg.precomputed_reference:
    e = plan.examples
    pairs = sum(map(len, e.train)) + len(e.held_out) + (
        sum(map(len, e.buffer)) if e.buffer_task == "preference" else 0)
    lines.append(f"reference log-probs: of {pairs} pairs, computed once "
                 "before the first step (or read from a cache)")
  lines += [workdir_line(workdir),
            "dry run: no weight read, nothing written; drop --dry_run to "
            "train"]
  return "\n".join(lines)
