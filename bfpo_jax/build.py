"""Everything a run builds before its first step: model, data, state.

Kept apart from :mod:`bfpo_jax.train` (the loop) so notebooks can build the
same pieces and call the step themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bfpo_jax import reference_cache, sharding
from bfpo_jax import train_step as ts
from bfpo_jax import trainable as trainable_lib
from bfpo_jax.config import (
  ConfigError,
  data_parallel_size,
  loss_setting,
  pack_length,
)
from bfpo_jax.data import packing, pipeline
from bfpo_jax.data.sources import DataError, SourceSpec
from bfpo_jax.model.mistral import abstract_params
from bfpo_jax.model_source import (  # noqa: F401 -- build's public names
  EXPORT_DIR,
  PEFT_DIR,
  check_model_source,
  initial_lora,
  load_model,
  model_config,
  model_folder,
  model_source,
  peft_adapter,
  tokenizer_for,
  with_peft_settings,
)
from bfpo_jax.optimizer import make_optimizer
from bfpo_jax.train_step import StepConfig, TrainState, pair_logps


def step_config(config) -> StepConfig:
  return StepConfig.from_config(config)


@dataclasses.dataclass
class RunData:
  train: pipeline.grain.MapDataset  # this process's batches, endless
  eval_batches: list  # this process's rows of each eval batch
  steps_per_epoch: int
  report: dict


def _split_eval(examples, fraction, seed):
  order = np.random.default_rng(seed).permutation(len(examples))
  n_eval = int(round(fraction * len(examples)))
  held = set(order[:n_eval].tolist())
  return ([e for i, e in enumerate(examples) if i not in held],
          [examples[i] for i in sorted(held)])


def _eval_batches(examples, task, size, buckets, pad_id, packed=None):
  """Fixed eval batches; the last is padded with zero-weight rows.

  ``packed`` (``pack_pairs`` keyword arguments) packs preference pairs
  instead; a packed batch's slots say which pair they hold (``pair_index``).
  """
  collate = pipeline.collate_sft if task == "sft" else pipeline.collate_pairs
  out = []
  for start in range(0, len(examples), size):
    chunk = examples[start:start + size]
    real = len(chunk)
    if packed and task != "sft":
      out.append(packing.pack_pairs(chunk, pad_id=pad_id, **packed))
      continue
    chunk = chunk + [chunk[0]] * (size - real)
    batch = collate(chunk, buckets=buckets, pad_id=pad_id)
    if task == "sft":
      batch["loss_mask"][real:] = False
    else:
      batch["weight"][real:] = 0.0
    out.append(batch)
  return out


def _local_rows(batch, index, count):
  return jax.tree.map(lambda x: x[index * len(x) // count:
                                  (index + 1) * len(x) // count], batch)


@dataclasses.dataclass
class Examples:
  """Validated, tokenized examples of a run, before batching."""

  task: str
  train: list  # one list of examples per source (packed rows if packed)
  held_out: list  # eval examples: held out of each source + eval_sources
  buffer: list  # buffer-stream examples per source ([] if none)
  report: dict
  pad_id: int
  buffer_task: str = "sft"


def _specs(config, field, task, limit=None):
  d = config.data
  return [SourceSpec.parse(s, task=task, limit=limit,
                           revision=d.revision or None) for s in d[field]]


def load_examples(config, tokenizer) -> Examples:
  """Reads, validates and tokenizes the run's data; splits off eval.

  The report has one entry per source (``role`` train, eval or buffer) whose
  ``pairs`` is what that source contributes to one epoch: its training
  examples, its evaluation examples, or the buffer examples one epoch draws
  (one buffer batch per step, so at most steps x global batch).
  """
  task = "sft" if config.stage == "sft" else "preference"
  d = config.data
  stream = task == "sft" and d.pack_sft and d.pack_mode == "stream"
  kwargs = dict(max_prompt_length=d.max_prompt_length,
                max_length=None if stream else d.max_length, seed=config.seed,
                num_workers=d.num_workers, template=d.template,
                truncation=d.truncation, sft_loss=d.sft_loss)
  specs = _specs(config, "sources", task, d.limit_per_source or None)
  examples, report = pipeline.prepare(specs, tokenizer, task=task, **kwargs)
  split = [_split_eval(ex, d.eval_fraction, config.seed + i)
           for i, ex in enumerate(examples)]
  train = [s[0] for s in split]
  held_out = [e for s in split for e in s[1]]
  for spec, (tr, ev) in zip(specs, split):
    report[spec.name].update(role="train", train=len(tr), eval=len(ev),
                             pairs=len(tr))
  if d.eval_sources:
    evals, eval_report = pipeline.prepare(_specs(config, "eval_sources", task),
                                          tokenizer, task=task, **kwargs)
    held_out += [e for ex in evals for e in ex]
    for name, entry in eval_report.items():
      report[f"eval:{name}"] = dict(entry, role="eval", train=0,
                                    eval=entry["rows_used"],
                                    pairs=entry["rows_used"])
  if stream:
    train = [pipeline.pack_stream(train, d.max_length, config.seed)]
    held_out = pipeline.pack_stream([held_out], d.max_length, config.seed)
  elif task == "sft" and d.pack_sft:
    train = [pipeline.pack_sft(ex, d.max_length, config.seed) for ex in train]
  n_train = sum(map(len, train))
  if n_train < config.batch.global_size:
    raise ConfigError(f"data: {n_train} training examples are fewer than "
                      f"batch.global_size ({config.batch.global_size})")
  buffer = []
  if d.buffer_sources:
    buffer_kwargs = dict(kwargs, max_length=d.max_length)
    buffer, buffer_report = pipeline.prepare(
        _specs(config, "buffer_sources", d.buffer_task), tokenizer,
        task=d.buffer_task, **buffer_kwargs)
    drawn = min(sum(map(len, buffer)),
                n_train // config.batch.global_size * config.batch.global_size)
    total = max(sum(map(len, buffer)), 1)
    for (name, entry), source in zip(buffer_report.items(), buffer):
      # Sources of a concat buffer are drawn in proportion to their size.
      report[f"buffer:{name}"] = dict(entry, role="buffer", train=0, eval=0,
                                      pairs=round(drawn * len(source) / total))
  if d.preference_layout == "packed":
    _check_pairs_fit(config, [train, [held_out]] + (
        [buffer] if d.buffer_task == "preference" else []), task)
  pad_id = tokenizer.pad_token_id
  return Examples(task=task, train=train, held_out=held_out, buffer=buffer,
                  report=report,
                  pad_id=tokenizer.eos_token_id if pad_id is None else pad_id,
                  buffer_task=d.buffer_task)


def _check_pairs_fit(config, groups, task):
  """Every preference pair must fit a packed row (``data.pack_length``)."""
  longest = max((packing.pair_tokens(e) for group in groups for source in group
                 for e in source if "chosen_ids" in e), default=0)
  if task == "preference" and longest > pack_length(config):
    raise ConfigError(f"data.pack_length: a pair takes {longest} tokens, more "
                      f"than a packed row of {pack_length(config)} (0 = 2 x "
                      "data.max_length holds any pair)")


def packing_options(config, rows_multiple):
  """``pack_pairs`` keyword arguments of the run, or None when padded."""
  if config.data.preference_layout != "packed":
    return None
  return dict(length=pack_length(config),
              pairs_per_row=config.data.pairs_per_row,
              rows_multiple=math.lcm(rows_multiple, jax.process_count()),
              buckets=tuple(config.data.buckets))


def make_data(config, examples: Examples, num_devices) -> RunData:
  """This process's endless training batches and the fixed eval batches.

  A buffer stream gives one batch of ``batch.global_size`` per step next to
  the main batch, so an epoch of the main stream sets the number of steps.
  """
  d, task, pad_id = config.data, examples.task, examples.pad_id
  p, n = jax.process_index(), jax.process_count()
  dp = data_parallel_size(config, num_devices)
  # Each device gets as many rows in every microbatch.
  layout = dict(layout=d.preference_layout, pack_length=pack_length(config),
                pairs_per_row=d.pairs_per_row,
                rows_multiple=dp * config.batch.accumulation)
  ds = pipeline.batches(examples.train, task=task,
                        global_batch=config.batch.global_size, seed=config.seed,
                        mixture=d.mixture, weights=list(d.weights) or None,
                        buckets=list(d.buckets), pad_id=pad_id,
                        process_index=p, process_count=n, **layout)
  if examples.buffer:
    ds = pipeline.with_buffer(ds, pipeline.batches(
        examples.buffer, task=examples.buffer_task,
        global_batch=config.batch.global_size, seed=config.seed + 1,
        buckets=list(d.buckets), pad_id=pad_id, process_index=p,
        process_count=n, **layout))
  eval_size = config.batch.per_device * dp
  eval_batches = _eval_batches(examples.held_out, task, eval_size,
                               list(d.buckets), pad_id,
                               packing_options(config, dp))
  return RunData(train=ds, eval_batches=[_local_rows(b, p, n)
                                         for b in eval_batches],
                 steps_per_epoch=steps_per_epoch(config, examples),
                 report=examples.report)


def steps_per_epoch(config, examples: Examples) -> int:
  return sum(map(len, examples.train)) // config.batch.global_size


def total_steps(config, examples: Examples) -> int:
  if config.max_steps > 0:
    return config.max_steps
  return max(1, config.num_epochs * steps_per_epoch(config, examples))


def attach_reference_logps(config, model_cfg, step_cfg, params, examples,
                           mesh, cache_path, notes=None):
  """Computes the reference log-probs of every pair once and stores them in
  the examples (``reference_chosen_logps``/``reference_rejected_logps``).

  ``params`` are the initial params, i.e. the reference in every trainable
  mode. Results are cached in ``cache_path`` under a key of the model source,
  data, lengths and seed, so a resumed run does not recompute them; with
  ``loss.reference_cache`` set, in that folder instead, shared by every run
  whose fingerprint matches (:mod:`bfpo_jax.reference_cache`), and ``notes``
  gets one line saying what the shared cache gave and, if nothing, why.

  Returns:
    True if the cache was used.
  """
  pairs = [e for source in examples.train for e in source] + examples.held_out
  if examples.buffer_task == "preference":
    pairs += [e for source in examples.buffer for e in source]
  key = json.dumps({"model": model_source(config) or config.model.preset,
                    "init_from": config.init_from,
                    "seed": config.seed, "data": config.data.to_dict(),
                    "average_logps": loss_setting(config, "average_logps"),
                    "dtype": config.model.dtype, "pairs": len(pairs)},
                   sort_keys=True)
  cached, from_cache, shared = None, False, config.loss.reference_cache
  if shared:
    fp = reference_cache.fingerprint(
        config, model_cfg, params, pairs, mesh=mesh,
        tokenizer=config.tokenizer or "(the model's)",
        average_logps=loss_setting(config, "average_logps"))
    cached, why = reference_cache.read(shared, fp)
    cached = reference_cache.agree(cached, len(pairs))
    from_cache = cached is not None
  elif os.path.exists(cache_path):
    with np.load(cache_path) as f:
      if str(f["key"]) == key:
        cached, from_cache = (f["chosen"], f["rejected"]), True
  if cached is None:
    dp = data_parallel_size(config, jax.device_count())
    size = config.batch.per_device * dp
    fn = jax.jit(sharding.with_activation_sharding(
        lambda p, b: pair_logps(model_cfg, step_cfg, p, b, mesh), mesh),
        out_shardings=sharding.replicated(mesh))
    batches = _eval_batches(pairs, "preference", size,
                               list(config.data.buckets), examples.pad_id,
                               packing_options(config, dp))
    p, n = jax.process_index(), jax.process_count()
    cached = (np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32))
    for start, b in zip(range(0, len(pairs), size), batches):
      out = jax.device_get(fn(params, global_batch(_local_rows(b, p, n), mesh)))
      # Padded rows are the pairs in order (then zero-weight copies);
      # packed slots say which pair they hold.
      index = (b["pair_index"] if "pair_index" in b
               else np.arange(len(out[0])))
      held = (index >= 0) & (index < len(pairs) - start)
      for side, logps in zip(cached, out):
        side[start + index[held]] = np.asarray(logps)[held]
    if jax.process_index() == 0 and not shared:
      np.savez(cache_path, key=key, chosen=cached[0], rejected=cached[1])
  if shared:  # saves a computed entry; says what the cache gave
    line = reference_cache.outcome(shared, fp, cached,
                                   None if from_cache else why)
    if notes is not None:
      notes.append(f"reference cache: {line}")
  for e, chosen, rejected in zip(pairs, *cached):
    e["reference_chosen_logps"] = float(chosen)
    e["reference_rejected_logps"] = float(rejected)
  return from_cache


def optimizer_for(config, steps: int):
  o = config.optimizer
  return make_optimizer(o.learning_rate, steps, name=o.name,
                        schedule=o.schedule, warmup_ratio=o.warmup_ratio,
                        weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def global_batch(batch, mesh):
  """This process's rows -> global arrays sharded over the batch axes."""
  spec = sharding.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x)),
      batch)


def train_state(config, model_cfg, step_cfg, params, optimizer, mesh,
                lora=None):
  """The run's sharded :class:`TrainState` and its shardings."""
  return ts.create_state(
      params, optimizer, step_cfg, model_cfg,
      pattern=config.trainable.pattern or None,
      lora_rank=config.trainable.lora_rank, rng=jax.random.key(config.seed),
      mesh=mesh, lora=lora)


def memory_estimate(config, model_cfg, mesh) -> dict:
  """Bytes per device the run will need (:func:`sharding.memory_report`)."""
  return sharding.memory_report(
      model_cfg, dict(mesh.shape), mode=config.trainable.mode,
      pattern=config.trainable.pattern or None,
      lora_rank=config.trainable.lora_rank, optimizer=config.optimizer.name,
      pairs_per_device=config.batch.per_device, seq_len=config.data.max_length,
      frozen_dtype=jnp.dtype(config.model.param_dtype),
      compute_dtype=jnp.dtype(config.model.dtype),
      chunk_size=config.loss.chunk_size,
      remat_policy=config.model.remat_policy,
      layout="padded" if config.stage == "sft" else config.data.preference_layout,
      pack_length=pack_length(config))


def empty_sources(config, report) -> list[str]:
  """Refuses a source with no usable rows unless allowed; else a warning."""
  empty = [f"{name} ({v['rows_read']} rows read, "
           f"{sum(v['rows_skipped'].values())} skipped)"
           for name, v in report.items() if not v.get("rows_used")]
  if not empty:
    return []
  if not config.data.allow_empty_sources:
    raise DataError(f"data: {'; '.join(empty)}: no usable rows; fix the "
                    "source or set --config.data.allow_empty_sources=True to "
                    "train on the others")
  return [f"warning: empty data source {e}; training on the others"
          for e in empty]


def state_shapes(config, model_cfg, step_cfg: StepConfig, optimizer):
  """The run's :class:`TrainState` as ``ShapeDtypeStruct`` leaves, from the
  model's shapes alone (what :func:`train_state` will build)."""
  abstract = abstract_params(model_cfg)
  mask = trainable_lib.trainable_mask(abstract, step_cfg.mode,
                                      config.trainable.pattern or None)
  return jax.eval_shape(lambda p: ts.init_state(
      p, mask, optimizer, step_cfg, lora_rank=config.trainable.lora_rank,
      rng=jax.random.key(config.seed)), abstract)


@dataclasses.dataclass
class Plan:
  """What a run decides before it reads a weight (:func:`plan`): what the
  dry run prints and what :func:`setup` builds from."""

  config: Any  # with a PEFT init_from's settings applied
  mesh: jax.sharding.Mesh
  tokenizer: Any
  model_cfg: Any
  step_cfg: StepConfig
  examples: Examples  # validated and tokenized; report: the data report
  steps: int  # optimizer steps of the whole run
  steps_per_epoch: int
  optimizer: Any  # the optax transformation, schedule of ``steps``
  shapes: TrainState  # the state at step 0, as ShapeDtypeStructs
  memory: dict  # the per-device estimate of :func:`memory_estimate`
  notes: list[str]  # lines for the log: warnings, what was precomputed


def plan(config) -> Plan:
  """Everything before the weights: mesh, model source and tokenizer
  checks, the data (read, tokenized, reported), the model's shapes, the step
  count and the memory estimate. Reads no model weight (only a PEFT adapter
  given as ``init_from``, for its settings) and writes nothing; bad data or
  config stop here, with one line."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                            config.mesh.tensor)
  check_model_source(config)
  config, notes = with_peft_settings(config)
  tokenizer = tokenizer_for(config)
  examples = load_examples(config, tokenizer)
  notes += empty_sources(config, examples.report)
  model_cfg = model_config(config)
  if len(tokenizer) > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer: {len(tokenizer)} tokens exceed the model's "
                      f"vocab_size {model_cfg.vocab_size}")
  steps = total_steps(config, examples)
  optimizer = optimizer_for(config, steps)
  step_cfg = step_config(config)
  return Plan(config=config, mesh=mesh, tokenizer=tokenizer,
              model_cfg=model_cfg, step_cfg=step_cfg, examples=examples,
              steps=steps, steps_per_epoch=steps_per_epoch(config, examples),
              optimizer=optimizer,
              shapes=state_shapes(config, model_cfg, step_cfg, optimizer),
              memory=memory_estimate(config, model_cfg, mesh), notes=notes)


@dataclasses.dataclass
class Run(Plan):
  """A :class:`Plan` carried out: data batches, the state and the jitted
  steps (:func:`setup`)."""

  data: RunData
  state: TrainState  # at step 0, sharded
  train_fn: Callable  # (state, batch) -> (state, metrics)
  eval_fn: Callable  # (state, batch) -> metrics as (total, weight) pairs


def setup(config, workdir: str) -> Run:
  """:func:`plan`, then the model's weights, optimizer state and jitted
  steps.

  Writes ``data_report.json`` and the resolved ``config.json`` to
  ``workdir`` (process 0). Bad data or config stop in :func:`plan`, with one
  line, before anything is written or loaded.
  """
  p = plan(config)
  config, examples, notes = p.config, p.examples, p.notes
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_report.json"), "w") as f:
      json.dump(examples.report, f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  model_cfg, params = load_model(config, p.mesh)
  step_cfg, mesh = p.step_cfg, p.mesh
  lora = initial_lora(config, model_cfg)
  if step_cfg.precomputed_reference:
    reference = params if lora is None else jax.jit(
        trainable_lib.lora_merge, static_argnums=2)(params, lora,
                                                    step_cfg.lora_scale)
    from_cache = attach_reference_logps(
        config, model_cfg, step_cfg, reference, examples, mesh,
        os.path.join(workdir, "reference_logps.npz"), notes)
    del reference
    notes.append("reference log-probs: "
                 + ("from cache" if from_cache else "precomputed"))
  data = make_data(config, examples, jax.device_count())
  state, shardings = train_state(config, model_cfg, step_cfg, params,
                                 p.optimizer, mesh, lora)
  del params, lora
  return Run(
      **{f.name: getattr(p, f.name) for f in dataclasses.fields(Plan)},
      data=data, state=state,
      train_fn=ts.build_train_step(model_cfg, step_cfg, p.optimizer,
                                   mesh=mesh, shardings=shardings),
      eval_fn=ts.build_eval_step(model_cfg, step_cfg, mesh=mesh,
                                 shardings=shardings, reduce=False))
