"""Training CLI: config -> mesh -> model -> data -> loop -> checkpoints.

    python -m bfpo_jax.train --config configs/tiny.py:sft --workdir runs/sft
    python -m bfpo_jax.train --config configs/a100x4.py --workdir runs/bfpo \\
        --config.init_from=runs/sft
    python -m bfpo_jax.train --export_only --workdir runs/sft  # hf_export/
                                                # from the latest checkpoint
    python -m bfpo_jax.train --config configs/tiny.py --dry_run  # the plan

One run at a time holds a workdir. A run started on a workdir that has
checkpoints resumes from the newest one that reads cleanly, data stream
included, and metrics.jsonl keeps exactly one line per step and kind.
SIGTERM/SIGINT save a checkpoint and exit cleanly. Bad configs and data stop
with one line (exit code 2) before anything heavy; a checkpoint that cannot
be written or read stops the run with one line (exit code 1).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bfpo_jax import (
  build,
  distributed,
  model_card,
  peft_io,
  resume,
  sharding,
  startup,
)
from bfpo_jax import metrics as metrics_lib
from bfpo_jax import train_step as ts
from bfpo_jax.checkpoint import (
  Checkpointer,
  RestoreError,
  SaveError,
  quiet_orbax_tracebacks,
)
from bfpo_jax.config import (
  ConfigError,
  default_config,
  loss_setting,
  validate,
)
from bfpo_jax.data.sources import DataError
from bfpo_jax.data.tokenize import CHAT_TEMPLATE
from bfpo_jax.model.hf_io import save_hf
from bfpo_jax.resume import resume_fingerprint  # noqa: F401 -- public name
from bfpo_jax.workdir import Logger, WorkdirError, hold, start_wandb

config_flags.DEFINE_config_file("config", None, "Python config file with "
                                "get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (default runs/<stage>).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (multi-process runs outside "
                    "SLURM/TPU, which are detected).")
flags.DEFINE_integer("num_processes", None, "Processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_integer("distributed_timeout", 300,
                     "Seconds to wait for all processes to join.")
flags.DEFINE_bool("export_only", False,
                  "Write WORKDIR/hf_export from the run's newest good "
                  "checkpoint and exit (config: --config or "
                  "WORKDIR/config.json).")
flags.DEFINE_bool("dry_run", False,
                  "Check the config, model folder, tokenizer and data; print "
                  "the plan (data report, mesh, model, memory, steps) and "
                  "exit, reading no weight and writing nothing.")


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row (``max_consecutive_nonfinite``)."""


def evaluate(eval_fn, state, data, mesh):
  """Metrics over all held-out batches, as one big batch.

  ``eval_fn`` returns each batch's metrics as ``(total, weight)`` pairs
  (``build_eval_step(..., reduce=False)``); they are summed over the batches
  and divided once. The trained-token total is a property of the data, not of
  the model, and is left out.
  """
  if not data.eval_batches:
    return {}
  summed = None  # on the devices: one copy to the host at the end
  for b in data.eval_batches:
    stats = eval_fn(state, build.global_batch(b, mesh))
    summed = stats if summed is None else jax.tree.map(jnp.add, summed, stats)
  summed.pop("tokens", None)
  return {k: float(v) for k, v in
          jax.device_get(metrics_lib.values(summed)).items()}


def _read_json(path):
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def export(config, model_cfg, state, step_cfg, tokenizer, workdir,
           summary=None, notes=None):
  """Writes workdir/hf_export: weights (LoRA merged), the tokenizer with the
  chat template the model was trained on (Zephyr's, or with
  ``data.template=tokenizer`` the model's own; for apply_chat_template, vLLM
  and the lm-evaluation-harness's chat mode) and a model card; a LoRA run
  also writes its adapters as a PEFT folder, workdir/peft_adapter.

  Args:
    summary: the run's summary for the model card (default: summary.json).
    notes: a list that gets a line for anything not exported, and why.

  Returns:
    The hf_export folder.
  """
  out = os.path.join(workdir, build.EXPORT_DIR)
  params = ts.policy_params(state, step_cfg)
  save_hf(out, model_cfg, params, dtype=jnp.dtype(config.model.param_dtype))
  source = build.model_source(config)
  card = dict(source=source, source_folder=build.model_folder(config),
              summary=summary or _read_json(os.path.join(workdir,
                                                         "summary.json")),
              report=_read_json(os.path.join(workdir, "data_report.json")))
  if config.trainable.mode == "lora":
    folder = os.path.join(workdir, build.PEFT_DIR)
    try:
      peft_io.save_peft(folder, state.trainable,
                        rank=config.trainable.lora_rank,
                        alpha=config.trainable.lora_alpha,
                        base_model=source)
      if jax.process_index() == 0:
        model_card.write(folder, config, library="peft", **card)
    except peft_io.AdapterError as e:
      if notes is not None:
        notes.append(f"no PEFT export: {e}")
  if jax.process_index() == 0:
    if config.data.template != "tokenizer":  # else the model's own is kept
      tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    model_card.write(out, config, **card)
  return out


def run(config, workdir: str) -> dict:
  """Trains one stage; returns a summary dict (also written to workdir)."""
  validate(config, jax.device_count())
  lock = hold(workdir)
  try:
    return _train(config, workdir)
  finally:
    lock.release()


def itstime(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action (log, eval, checkpoint) falls on ``step``:
  every ``every``-th step (0 = never) and always the ``last_step``."""
  return step == last_step or (every > 0 and step % every == 0)


class Loop:
  """The training loop and what it carries from step to step.

  Holds the train state, the data iterator, the non-finite counters, the
  metrics of dispatched steps whose lines are not written yet, and the logger
  and checkpointer those go to. A step's metrics are read one step late, so
  the host never waits for the device between dispatches.
  """

  def __init__(self, run: build.Run, ckpt: Checkpointer, log: Logger,
               iterator, counters=None, fingerprint=None):
    self.run, self.ckpt, self.log, self.iterator = run, ckpt, log, iterator
    self.config = run.config
    self.state = run.state
    # Saved counters over the defaults: a checkpoint may predate a counter.
    self.counters = {"nonfinite_total": 0, "nonfinite_in_a_row": 0,
                     **(counters or {})}
    self.fingerprint = fingerprint or resume.fingerprint(run.config, run.state)
    self.settings = resume.resume_settings(run.config)
    self.pending = []  # (step, metrics, tokens, data_s) not yet written
    self.last_time = time.perf_counter()
    self.last_eval = None
    self.stop_signal = None

  def meta(self) -> dict:
    """What a checkpoint stores beside the state."""
    return {"data_iterator": self.iterator.get_state(),
            "counters": dict(self.counters), "fingerprint": self.fingerprint,
            "settings": self.settings}

  def _record(self, step, metrics, tokens, data_s):
    self.ckpt.check()  # a failed save stops the run before later lines
    metrics = jax.device_get(metrics)  # blocks until that step is done
    now = time.perf_counter()
    seconds, self.last_time = now - self.last_time, now
    if metrics["nonfinite"]:
      self.counters["nonfinite_total"] += 1
      self.counters["nonfinite_in_a_row"] += 1
      self.log.info(f"step {step}: non-finite loss or gradient; update "
                    f"skipped ({self.counters['nonfinite_in_a_row']} in a row)")
    else:
      self.counters["nonfinite_in_a_row"] = 0
    if itstime(step, self.config.log_every_steps, self.run.steps):
      # data_s: host time spent getting this step's batch, while the
      # previous step ran; step_s: wall time between two finished steps.
      metrics = dict(metrics, tokens_per_s=tokens / max(seconds, 1e-9),
                     data_s=data_s, step_s=seconds)
      self.log.write(step, metrics)
    self.log.progress(step, metrics, tokens / max(seconds, 1e-9))

  def flush(self, keep=0, check=True):
    """Writes the lines of all but the ``keep`` newest pending steps."""
    while len(self.pending) > keep:
      step = self.pending[0][0]
      self._record(*self.pending.pop(0))
      in_a_row = self.counters["nonfinite_in_a_row"]
      if check and in_a_row >= self.config.max_consecutive_nonfinite:
        raise NonFiniteError(f"{in_a_row} non-finite steps in a row at step "
                             f"{step}")

  def evaluate(self):
    self.last_eval = evaluate(self.run.eval_fn, self.state, self.run.data,
                              self.run.mesh)
    return self.last_eval

  def step(self, step: int) -> None:
    """Dispatches one step; writes the previous step's line meanwhile."""
    tick = time.perf_counter()
    local = next(self.iterator)
    tokens = sum(int(np.sum(v)) for k, v in local.items()
                 if k.endswith("attention_mask")) * jax.process_count()
    batch = build.global_batch(local, self.run.mesh)
    data_s = time.perf_counter() - tick
    self.state, metrics = self.run.train_fn(self.state, batch)
    self.pending.append((step, metrics, tokens, data_s))
    self.flush(keep=1)

  def train(self) -> str:
    """Runs to the last step or a stop signal; returns the status."""
    c, steps = self.config, self.run.steps
    start = int(jax.device_get(self.state.step))
    for step in range(start + 1, steps + 1):
      self.step(step)
      stopping = self.stop_signal is not None
      eval_due = itstime(step, c.eval_every_steps, steps)
      save_due = itstime(step, c.checkpoint_every_steps, steps) or stopping
      if eval_due or save_due:
        # A checkpoint at this step must find its lines already written:
        # a kill after it commits would otherwise lose them for good.
        self.flush()
      if eval_due:
        self.log.write(step, self.evaluate(), prefix="eval/")
      if save_due:
        self.log.sync()
        self.ckpt.save(self.state, self.meta(), force=step == steps or stopping)
      if stopping:
        return f"stopped by {self.stop_signal}"
    return "finished"

  def on_signal(self, signum, _):
    self.stop_signal = signal.Signals(signum).name

  def save_after_nonfinite(self, error: NonFiniteError):
    self.flush(check=False)
    self.ckpt.save(self.state, self.meta(), force=True)
    self.ckpt.close()
    self.log.close()
    raise ConfigError(f"training stopped: {error}; checkpoint saved at step "
                      f"{int(jax.device_get(self.state.step))}") from None


def _train(config, workdir: str) -> dict:
  run = build.setup(config, workdir)
  config = run.config
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      keep=config.keep_checkpoints)
  iterator = iter(run.data.train.to_iter_dataset())
  fingerprint = resume.fingerprint(config, run.state)  # the state at step 0
  run.state, counters, resume_notes = resume.restore(
      ckpt, run.state, iterator, config, workdir, fingerprint)
  start = int(jax.device_get(run.state.step))
  notes = run.notes + resume_notes
  wandb_run = start_wandb(config, workdir, {
      "effective/loss.beta": loss_setting(config, "beta"),
      "effective/loss.average_logps": loss_setting(config, "average_logps")})
  if wandb_run is not None:
    notes.append(f"wandb: run {wandb_run.name} (" + (
        f"offline, in {wandb_run.dir}" if wandb_run.offline else wandb_run.url)
        + ")")
  log = Logger(workdir, config.stage, run.steps, start,
               start if counters is not None else None, wandb_run)
  log.info(startup.summary(run))
  for note in notes:
    log.info(note)
  log.start_progress()

  loop = Loop(run, ckpt, log, iterator, counters, fingerprint)
  previous = {s: signal.signal(s, loop.on_signal)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    status = loop.train()
  except NonFiniteError as e:
    loop.save_after_nonfinite(e)
  except BaseException:
    log.close()  # the progress bar ends before the error line
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)

  ckpt.close()
  log.stop_progress()
  final_step = int(jax.device_get(loop.state.step))
  summary = {"status": status, "step": final_step, "steps": run.steps,
             "nonfinite_steps": loop.counters["nonfinite_total"]}
  if status == "finished":
    # Resumed at the end, the loop ran no step: its eval line is written.
    last_eval = loop.last_eval if loop.last_eval is not None else loop.evaluate()
    summary["eval"] = {k: float(v) for k, v in last_eval.items()}
    if config.export_hf:
      export_notes = []
      summary["export"] = export(config, run.model_cfg, loop.state,
                                 run.step_cfg, run.tokenizer, workdir, summary,
                                 export_notes)
      for note in export_notes:
        log.info(note)
  log.info(f"{status} at step {final_step}/{run.steps}; workdir {workdir}")
  log.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def export_only(config, workdir: str) -> str:
  """Writes ``workdir/hf_export`` from the run's newest good checkpoint."""
  validate(config, jax.device_count())
  lock = hold(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                              config.mesh.tensor)
    build.check_model_source(config)
    config, notes = build.with_peft_settings(config)
    tokenizer = build.tokenizer_for(config)
    model_cfg, params = build.load_model(config, mesh)
    step_cfg = build.step_config(config)
    # The schedule's length changes values, not the optimizer state's layout.
    optimizer = build.optimizer_for(config, max(config.max_steps, 1))
    state, _ = build.train_state(config, model_cfg, step_cfg, params,
                                 optimizer, mesh,
                                 build.initial_lora(config, model_cfg))
    del params
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        keep=config.keep_checkpoints)
    restored = ckpt.restore(state, functools.partial(
        resume.check_same_run, resume.fingerprint(config, state), workdir))
    if restored is None:
      raise ConfigError(f"{workdir}: no checkpoints to export")
    state, _, skipped = restored
    notes += skipped
    out = export(config, model_cfg, state, step_cfg, tokenizer, workdir,
                 notes=notes)
    if jax.process_index() == 0:
      for note in notes:
        print(note)
      print(f"exported step {int(jax.device_get(state.step))} to {out}")
    return out
  finally:
    lock.release()


def _saved_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"--config is required ({path} does not exist)")
  with open(path) as f:
    saved = json.load(f)

  def merged(default, given):  # fields added since the run take defaults
    return {k: merged(v, given.get(k, {})) if isinstance(v, dict)
            else given.get(k, v) for k, v in default.items()}

  return ml_collections.ConfigDict(merged(default_config().to_dict(), saved))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  quiet_orbax_tracebacks(logging.get_absl_handler())
  f = flags.FLAGS
  config = f.config
  try:
    if config is None and not (f.export_only and f.workdir):
      raise ConfigError("--config is required (e.g. --config configs/tiny.py)")
    config = config or _saved_config(f.workdir)
    workdir = f.workdir or os.path.join("runs", config.stage)
    if f.dry_run and f.export_only:
      raise ConfigError("--dry_run and --export_only: pick one")
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           timeout_s=f.distributed_timeout)
    if f.dry_run:
      if jax.process_index() == 0:
        print(startup.dry_run(config, workdir))
      return
    (export_only if f.export_only else run)(config, workdir)
  except (ConfigError, DataError, FileNotFoundError, WorkdirError,
          distributed.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (SaveError, RestoreError) as e:  # the machine failed, not the input
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _unknown_field(error, argv) -> str:
  """``unknown config field 'betaa'; did you mean 'beta'?``"""
  name = (re.findall(r"[\w-]+", str(error)) or [str(error)])[0]
  overrides = [a[len("--config."):].split("=")[0].split(".") for a in argv
               if a.startswith("--config.")]
  path = next((p for p in overrides if name in p), [name])
  siblings = default_config()  # the fields beside the unknown one
  for part in path[:path.index(name)]:
    siblings = siblings.get(part) if isinstance(
        siblings, ml_collections.ConfigDict) else None
  known = list(siblings.keys()) if isinstance(
      siblings, ml_collections.ConfigDict) else []
  close = difflib.get_close_matches(name, known, n=1)
  return f"unknown config field '{name}'" + (
      f"; did you mean '{close[0]}'?" if close else "")


def parse_flags(argv):
  """absl flag parsing, with a bad override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if isinstance(e, AttributeError | KeyError):
      message = _unknown_field(e, argv)
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
