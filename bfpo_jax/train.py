"""Training CLI: config -> mesh -> model -> data -> loop -> checkpoints.

    python -m bfpo_jax.train --config configs/tiny.py:sft --workdir runs/sft
    python -m bfpo_jax.train --config configs/a100x4.py --workdir runs/bfpo \\
        --config.init_from=runs/sft

A run started on a workdir that has checkpoints resumes from the latest one,
data stream included. SIGTERM/SIGINT save a checkpoint and exit cleanly.
Bad configs and data stop with one line (exit code 2) before anything heavy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bfpo_jax import build, distributed, sharding, trainable
from bfpo_jax import train_step as ts
from bfpo_jax.checkpoint import Checkpointer
from bfpo_jax.config import ConfigError, validate
from bfpo_jax.data.sources import DataError
from bfpo_jax.data.tokenize import CHAT_TEMPLATE
from bfpo_jax.model.hf_io import save_hf

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


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row (``max_consecutive_nonfinite``)."""


class Logger:
  """metrics.jsonl, TensorBoard and the progress bar; process 0 only."""

  def __init__(self, workdir, stage, total, start, resumed_step):
    self.stage, self.active = stage, jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    if resumed_step is not None and os.path.exists(self.path):
      with open(self.path) as f:  # drop lines the restored run will redo
        keep = [line for line in f if json.loads(line)["step"] <= resumed_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = tqdm(total=total, initial=start, desc=stage, unit="step",
                    dynamic_ncols=True)

  def write(self, step, metrics, prefix=""):
    if not self.active:
      return
    record = {"step": step, "stage": self.stage}
    record.update({prefix + k: float(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k not in ("step", "stage"):
        self.tb.add_scalar(k, v, step)

  def progress(self, step, metrics, tokens_per_s):
    if self.active:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{float(metrics['loss']):.4g}",
                           tok_s=f"{tokens_per_s:,.0f}")

  def info(self, text):
    if self.active:
      (self.bar.write if hasattr(self, "bar") else print)(text)

  def close(self):
    if self.active:
      self.bar.close()
      self.tb.close()


def _summary(config, mesh, model_cfg, state, data, steps, memory):
  n_train = trainable.count_params(state.trainable)
  total = trainable.count_params(state.frozen) + (
      0 if config.trainable.mode == "lora" else n_train)
  lines = [
      f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.process_count()} process(es)); mesh {dict(mesh.shape)}",
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
          for k, v in data.report.items()),
      f"steps: {steps} ({data.steps_per_epoch} per epoch), global batch "
      f"{config.batch.global_size} = {config.batch.per_device} per device x "
      f"{config.batch.accumulation} microbatches",
  ]
  return "\n".join(lines)


def resume_fingerprint(config) -> dict:
  """Config fields that a checkpoint's state and data position depend on."""
  return {"stage": config.stage, "model": build.model_source(config) or
          config.model.preset, "trainable": config.trainable.to_dict(),
          "data": list(config.data.sources), "seed": config.seed,
          "global_batch": config.batch.global_size}


def evaluate(eval_fn, state, data, mesh):
  """Metrics over all held-out batches, weighted as one big batch."""
  if not data.eval_batches:
    return {}
  per_batch = [jax.device_get(eval_fn(state, build.global_batch(b, mesh)))
               for b in data.eval_batches]
  stacked = {k: np.array([m[k] for m in per_batch]) for k in per_batch[0]}
  stacked["share"] = np.array(data.eval_shares)
  stacked.pop("tokens", None)
  metrics = ts.combine_metrics(stacked)
  total = max(sum(data.eval_shares), 1e-12)
  metrics["loss"] = np.sum(stacked["loss"] * stacked["share"]) / total
  if "buffer_loss" in stacked:
    metrics["buffer_loss"] = np.sum(stacked["buffer_loss"] * stacked["share"]) / total
  return metrics


def export(config, model_cfg, state, step_cfg, tokenizer, workdir):
  """Writes workdir/hf_export: weights, and the tokenizer with the Zephyr
  chat template the model was trained on (for apply_chat_template, vLLM and
  the lm-evaluation-harness's chat mode)."""
  out = os.path.join(workdir, build.EXPORT_DIR)
  params = ts.policy_params(state, step_cfg)
  save_hf(out, model_cfg, params, dtype=jnp.dtype(config.model.param_dtype))
  if jax.process_index() == 0:
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
  return out


def run(config, workdir: str) -> dict:
  """Trains one stage; returns a summary dict (also written to workdir)."""
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                            config.mesh.tensor)
  tokenizer = build.tokenizer_for(config)
  examples = build.load_examples(config, tokenizer)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_report.json"), "w") as f:
      json.dump(examples.report, f, indent=2)
  model_cfg, params = build.load_model(config, mesh)
  if len(tokenizer) > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer: {len(tokenizer)} tokens exceed the model's "
                      f"vocab_size {model_cfg.vocab_size}")
  steps = build.total_steps(config, examples)
  optimizer = build.optimizer_for(config, steps)
  step_cfg = build.step_config(config)
  reference_note = ""
  if step_cfg.precomputed_reference:
    from_cache = build.attach_reference_logps(
        config, model_cfg, step_cfg, params, examples, mesh,
        os.path.join(workdir, "reference_logps.npz"))
    reference_note = ("reference log-probs: "
                      + ("from cache" if from_cache else "precomputed"))
  data = build.make_data(config, examples, jax.device_count())
  state, shardings = ts.create_state(
      params, optimizer, step_cfg, model_cfg, pattern=config.trainable.pattern or None,
      lora_rank=config.trainable.lora_rank, rng=jax.random.key(config.seed),
      mesh=mesh)
  del params

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      every_steps=config.checkpoint_every_steps,
                      keep=config.keep_checkpoints)
  iterator = iter(data.train.to_iter_dataset())
  counters = {"nonfinite_total": 0, "nonfinite_in_a_row": 0}
  fingerprint = resume_fingerprint(config)
  resumed = ckpt.latest_step
  if resumed is not None:
    saved = ckpt.fingerprint()
    changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    if changed:
      raise ConfigError(
          f"{workdir} holds checkpoints of a different run ({', '.join(changed)} "
          "changed); use a new --workdir or the original config")
    state, meta = ckpt.restore(state)
    iterator.set_state(meta["data_iterator"])
    counters.update(meta["counters"])
  start = int(jax.device_get(state.step))

  train_fn = ts.build_train_step(model_cfg, step_cfg, optimizer, mesh=mesh,
                                 shardings=shardings)
  eval_fn = ts.build_eval_step(model_cfg, step_cfg, mesh=mesh,
                               shardings=shardings)
  memory = sharding.memory_report(
      model_cfg, dict(mesh.shape), mode=config.trainable.mode,
      pattern=config.trainable.pattern or None,
      lora_rank=config.trainable.lora_rank, optimizer=config.optimizer.name,
      pairs_per_device=config.batch.per_device, seq_len=config.data.max_length,
      frozen_dtype=jnp.dtype(config.model.param_dtype),
      compute_dtype=jnp.dtype(config.model.dtype),
      chunk_size=config.loss.chunk_size,
      remat_policy=config.model.remat_policy)
  log = Logger(workdir, config.stage, steps, start, resumed)
  log.info(_summary(config, mesh, model_cfg, state, data, steps, memory))
  if reference_note:
    log.info(reference_note)
  if resumed is not None:
    log.info(f"resumed from checkpoint at step {resumed}")

  stop = {"signal": None}

  def on_signal(signum, _):
    stop["signal"] = signal.Signals(signum).name

  previous = {s: signal.signal(s, on_signal)
              for s in (signal.SIGTERM, signal.SIGINT)}

  def meta():
    return {"data_iterator": iterator.get_state(), "counters": dict(counters),
            "fingerprint": fingerprint}

  clock = {"last": time.perf_counter()}

  def record(step, metrics, tokens, data_s):
    metrics = jax.device_get(metrics)  # blocks until that step is done
    now = time.perf_counter()
    seconds, clock["last"] = now - clock["last"], now
    if metrics["nonfinite"]:
      counters["nonfinite_total"] += 1
      counters["nonfinite_in_a_row"] += 1
      log.info(f"step {step}: non-finite loss or gradient; update skipped "
               f"({counters['nonfinite_in_a_row']} in a row)")
    else:
      counters["nonfinite_in_a_row"] = 0
    if step % config.log_every_steps == 0 or step == steps:
      # data_s: host time spent getting this step's batch, while the
      # previous step ran; step_s: wall time between two finished steps.
      metrics = dict(metrics, tokens_per_s=tokens / max(seconds, 1e-9),
                     data_s=data_s, step_s=seconds)
      log.write(step, metrics)
    log.progress(step, metrics, tokens / max(seconds, 1e-9))
    if counters["nonfinite_in_a_row"] >= config.max_consecutive_nonfinite:
      raise NonFiniteError(f"{counters['nonfinite_in_a_row']} non-finite steps "
                           f"in a row at step {step}")

  status = "finished"
  pending = None
  try:
    for step in range(start + 1, steps + 1):
      tick = time.perf_counter()
      local = next(iterator)
      tokens = sum(int(np.sum(v)) for k, v in local.items()
                   if k.endswith("attention_mask")) * jax.process_count()
      batch = build.global_batch(local, mesh)
      data_s = time.perf_counter() - tick
      state, metrics = train_fn(state, batch)
      if pending:  # read the previous step's metrics after dispatching this one
        record(*pending)
      pending = (step, metrics, tokens, data_s)
      if ckpt.due(step):
        ckpt.save(state, meta())
      if config.eval_every_steps and step % config.eval_every_steps == 0:
        log.write(step, evaluate(eval_fn, state, data, mesh), prefix="eval/")
      if stop["signal"]:
        status = f"stopped by {stop['signal']}"
        break
    if pending:
      record(*pending)
  except NonFiniteError as e:
    ckpt.save(state, meta(), force=True)
    ckpt.close()
    log.close()
    raise ConfigError(f"training stopped: {e}; checkpoint saved at step "
                      f"{int(jax.device_get(state.step))}") from None
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)

  ckpt.save(state, meta(), force=True)
  ckpt.close()
  final_step = int(jax.device_get(state.step))
  summary = {"status": status, "step": final_step, "steps": steps,
             "nonfinite_steps": counters["nonfinite_total"]}
  if status == "finished":
    eval_metrics = evaluate(eval_fn, state, data, mesh)
    log.write(final_step, eval_metrics, prefix="eval/")
    summary["eval"] = {k: float(v) for k, v in eval_metrics.items()}
    if config.export_hf:
      summary["export"] = export(config, model_cfg, state, step_cfg, tokenizer,
                                 workdir)
  log.info(f"{status} at step {final_step}/{steps}; workdir {workdir}")
  log.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  if config is None:
    print("error: --config is required (e.g. --config configs/tiny.py)",
          file=sys.stderr)
    sys.exit(2)
  workdir = flags.FLAGS.workdir or os.path.join("runs", config.stage)
  f = flags.FLAGS
  try:
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           timeout_s=f.distributed_timeout)
    run(config, workdir)
  except (ConfigError, DataError, FileNotFoundError,
          distributed.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl flag parsing, with a bad override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if isinstance(e, AttributeError | KeyError):
      message = f"unknown config field {message.strip(chr(34))}"
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
