"""Jitted SFT / BFPO / DPO / IPO steps over sharded params.

The step glues three pure pieces: the model (hidden states), the losses
(chunked log-probs, preference or SFT loss) and optax. It differentiates only
the trainable tree (see :mod:`bfpo_jax.trainable`), accumulates gradients
over microbatches in a ``lax.scan``, and skips the update when the loss or the
gradients are not finite.

Batch layout (leading axis = global batch; B pairs or sequences):

* preference stages, padded: ``chosen_input_ids``, ``chosen_attention_mask``,
  ``chosen_loss_mask`` and the same ``rejected_*`` [B, T]; ``chosen_is_safe``,
  ``rejected_is_safe`` [B]; optional ``weight`` [B] (0 for padding pairs);
  with ``precomputed_reference``, ``reference_chosen_logps`` and
  ``reference_rejected_logps`` [B].
* preference stages, packed (``data.packing``; recognised by
  ``branch_ids``): B rows of ``input_ids``, ``attention_mask``,
  ``positions``, ``segment_ids``, ``branch_ids``, ``loss_mask`` [B, T], each
  holding up to M pairs, and the per-pair keys above as [B, M] slots
  (``weight`` 0 in empty slots). The reference forward uses the same rows.
* ``sft``: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T]; optional
  ``segment_ids`` [B, T] for packed rows (see ``data.pipeline.pack_sft``).
* optional ``buffer``: a second batch, drawn from its own stream, whose loss
  is added with ``buffer_weight``: an SFT batch (``buffer_task="sft"``) or a
  preference batch (``"preference"``, the reference's helpfulness stream:
  loss = mean over the main pairs + weight x mean over the buffer pairs).

``loss_mask[b, t]`` marks tokens whose probability counts (the response):
position t - 1 predicts token t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from bfpo_jax import logprobs, losses, sharding
from bfpo_jax import metrics as metrics_lib
from bfpo_jax.config import STAGES, default_config, step_settings
from bfpo_jax.model.mistral import apply_hidden, unembedding
from bfpo_jax.trainable import combine, init_lora, lora_merge, split, trainable_mask

_DEFAULTS = step_settings(default_config())


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a step (hashable; part of the jit cache key).

  The defaults are those of :func:`bfpo_jax.config.default_config` (one BFPO
  stage, 4 microbatches, selective fine-tuning); the config's comments say
  what each one means. :meth:`from_config` maps a run's config.
  """

  stage: str = _DEFAULTS["stage"]  # sft | bfpo | dpo | ipo
  beta: float = _DEFAULTS["beta"]  # tau of the paper
  alpha: float = _DEFAULTS["alpha"]  # BFPO labeling shift
  b1: float = _DEFAULTS["b1"]  # BFPO labeling scale
  label_smoothing: float = _DEFAULTS["label_smoothing"]  # DPO only
  average_logps: bool = _DEFAULTS["average_logps"]  # length-average log-probs
  chunk_size: int = _DEFAULTS["chunk_size"]  # tokens per log-prob chunk
  vocab_chunk_size: int | None = _DEFAULTS["vocab_chunk_size"]
  accumulation_steps: int = _DEFAULTS["accumulation_steps"]  # microbatches
  buffer_weight: float = _DEFAULTS["buffer_weight"]  # 0 = no buffer term
  buffer_task: str = _DEFAULTS["buffer_task"]  # sft | preference
  precomputed_reference: bool = _DEFAULTS["precomputed_reference"]
  mode: str = _DEFAULTS["mode"]  # full | selective | lora
  lora_scale: float = _DEFAULTS["lora_scale"]  # alpha / rank

  @classmethod
  def from_config(cls, config) -> StepConfig:
    return cls(**step_settings(config))

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
    if self.accumulation_steps < 1:
      raise ValueError("accumulation_steps must be >= 1")
    if self.buffer_task not in ("sft", "preference"):
      raise ValueError(f"buffer_task must be sft or preference, got "
                       f"{self.buffer_task!r}")


class TrainState(NamedTuple):
  step: jax.Array
  trainable: Any  # float32 masters of the trainable leaves / LoRA adapters
  frozen: Any  # the other leaves (all leaves under LoRA)
  reference: Any  # initial trainable leaves; under LoRA the adapters a run
  # started from (e.g. a PEFT folder), else None: the base is the reference
  opt_state: Any


def init_state(params, mask, optimizer, step_cfg: StepConfig, *, lora_rank=16,
               rng=None, lora=None) -> TrainState:
  """Training state from params and a trainable mask (pure; jit it sharded).

  The reference copy of trainable leaves keeps the params' dtype: the model
  casts kernels to the compute dtype anyway, so it costs half a float32 copy.
  ``lora``: LoRA adapters to start from (shaped as ``init_lora``'s) instead
  of fresh ones; the policy they give is then also the reference.
  """
  if step_cfg.mode == "lora":
    frozen, reference = params, None
    if lora is None:
      trainable = init_lora(params, mask, lora_rank,
                            jax.random.key(0) if rng is None else rng)
    else:
      trainable = jax.tree.map(lambda x: x.astype(jnp.float32), lora)
      reference = None if step_cfg.precomputed_reference else trainable
  else:
    trainable, frozen = split(params, mask)
    # With precomputed reference log-probs no reference copy is needed.
    reference = None if step_cfg.precomputed_reference else trainable
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
  return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, reference,
                    optimizer.init(trainable))


def policy_params(state: TrainState, step_cfg: StepConfig):
  if step_cfg.mode == "lora":
    return lora_merge(state.frozen, state.trainable, step_cfg.lora_scale)
  return combine(state.trainable, state.frozen)


def reference_params(state: TrainState, step_cfg: StepConfig):
  if step_cfg.mode == "lora":
    if state.reference is None:
      return state.frozen
    return lora_merge(state.frozen, state.reference, step_cfg.lora_scale)
  return combine(state.reference, state.frozen)


def _logps_from_hidden(hidden_BxTxD, w_DxV, labels_BxT, loss_mask_BxT, *,
                       step_cfg, per_token, with_logits=False):
  kwargs = dict(chunk_size=step_cfg.chunk_size,
                vocab_chunk_size=step_cfg.vocab_chunk_size)
  if per_token:
    return logprobs.chunked_token_logps(hidden_BxTxD, w_DxV, labels_BxT,
                                        mask=loss_mask_BxT, **kwargs)
  logps_B = logprobs.chunked_sequence_logps(hidden_BxTxD, w_DxV, labels_BxT,
                                            loss_mask_BxT,
                                            average=step_cfg.average_logps,
                                            **kwargs)
  if with_logits:
    return logps_B, logprobs.mean_logits(jax.lax.stop_gradient(hidden_BxTxD),
                                         w_DxV, loss_mask_BxT)
  return logps_B


def sequence_logps(model_cfg, step_cfg, params, input_ids, attention_mask,
                   loss_mask, *, per_token=False, segment_ids=None, mesh=None,
                   with_logits=False):
  """[B] response log-probs (or [B, T-1] per token) via the chunked path.

  ``with_logits`` also returns each row's mean logit over its response
  positions (``logprobs.mean_logits``), as ``(logps, mean_logits)``.

  With a ``mesh``, the log-probs run per device on its own rows
  (``shard_map`` over the batch axes, the output matrix gathered whole):
  left to itself, XLA shards the chunk loop's matmul over the model width
  instead and all-reduces every chunk's [C, V] logits.
  """
  hidden_BxTxD = apply_hidden(model_cfg, params, input_ids, attention_mask,
                              segment_ids=segment_ids)
  w_DxV = unembedding(model_cfg, params).astype(model_cfg.dtype)
  fn = functools.partial(_logps_from_hidden, step_cfg=step_cfg,
                         per_token=per_token, with_logits=with_logits)
  if mesh is not None:
    rows = PartitionSpec(sharding.BATCH_AXES)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(rows, PartitionSpec(), rows, rows),
                       out_specs=(rows, rows) if with_logits else rows,
                       axis_names=frozenset(sharding.BATCH_AXES))
  return fn(hidden_BxTxD[:, :-1], w_DxV, input_ids[:, 1:], loss_mask[:, 1:])


def packed_pair_logps(model_cfg, step_cfg, params, batch, mesh=None, *,
                      with_logits=False):
  """Chosen and rejected [B, M] log-probs of packed rows, one forward.

  Each pair's prompt runs once, its two responses beside it; see
  ``data.packing`` and ``logprobs.packed_pair_logps``. With a ``mesh`` the
  log-probs run per device on its own rows, as in :func:`sequence_logps`.
  """
  hidden_BxTxD = apply_hidden(model_cfg, params, batch["input_ids"],
                              batch["attention_mask"],
                              positions=batch["positions"],
                              segment_ids=batch["segment_ids"],
                              branch_ids=batch["branch_ids"])
  w_DxV = unembedding(model_cfg, params).astype(model_cfg.dtype)
  fn = functools.partial(
      logprobs.packed_pair_logps, num_slots=batch["weight"].shape[1],
      chunk_size=step_cfg.chunk_size, average=step_cfg.average_logps,
      vocab_chunk_size=step_cfg.vocab_chunk_size, with_logits=with_logits)
  if mesh is not None:
    rows = PartitionSpec(sharding.BATCH_AXES)
    pairs = (rows, rows)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(rows, PartitionSpec()) + (rows,) * 4,
                       out_specs=(pairs, pairs) if with_logits else pairs,
                       axis_names=frozenset(sharding.BATCH_AXES))
  return fn(hidden_BxTxD[:, :-1], w_DxV, *(batch[k][:, 1:] for k in (
      "input_ids", "loss_mask", "segment_ids", "branch_ids")))


def pair_logps(model_cfg, step_cfg, params, batch, mesh=None, *,
               with_logits=False):
  """Chosen and rejected [B] log-probs from one forward over [2B, T].

  Rows are interleaved (chosen 0, rejected 0, chosen 1, ...), so a device's
  pairs stay on it: concatenating instead would move every row of half the
  batch to another device. ``with_logits`` returns
  ``((chosen, rejected), (chosen_mean_logits, rejected_mean_logits))``. A
  packed batch goes to :func:`packed_pair_logps` ([B, M] per side).
  """
  if "branch_ids" in batch:
    return packed_pair_logps(model_cfg, step_cfg, params, batch, mesh,
                             with_logits=with_logits)
  both = lambda k: jnp.stack([batch[f"chosen_{k}"],  # noqa: E731
                              batch[f"rejected_{k}"]], axis=1).reshape(
                                  -1, batch[f"chosen_{k}"].shape[1])
  out = sequence_logps(model_cfg, step_cfg, params, both("input_ids"),
                       both("attention_mask"), both("loss_mask"), mesh=mesh,
                       with_logits=with_logits)
  if with_logits:
    return (out[0][0::2], out[0][1::2]), (out[1][0::2], out[1][1::2])
  return out[0::2], out[1::2]


def _pair_weights(batch):
  return batch.get("weight", jnp.ones(batch["chosen_is_safe"].shape,
                                      jnp.float32)).astype(jnp.float32)


def _sft_tokens(batch):
  return jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))


def _size(batch, task):
  """What a batch's mean is over: trained tokens (sft) or pair weights."""
  return (_sft_tokens(batch) if task == "sft"
          else jnp.sum(_pair_weights(batch)))


def _denominators(batch, step_cfg):
  """Full-batch normalisers, so k microbatches sum to one big batch exactly."""
  main = _size(batch, "sft" if step_cfg.stage == "sft" else "preference")
  buffer = (_size(batch["buffer"], step_cfg.buffer_task) if "buffer" in batch
            else jnp.float32(1))
  return jnp.maximum(main, 1e-6), jnp.maximum(buffer, 1.0)


def _sft_term(model_cfg, step_cfg, params, batch, mesh):
  token_logps = sequence_logps(model_cfg, step_cfg, params, batch["input_ids"],
                               batch["attention_mask"], batch["loss_mask"],
                               per_token=True,
                               segment_ids=batch.get("segment_ids"), mesh=mesh)
  return losses.sft_loss_from_token_logps(token_logps, batch["loss_mask"][:, 1:],
                                          reduce=False)


def preference_loss(step_cfg, policy, reference, batch, *, reduce=True):
  """The stage's loss on [B] (or packed [B, M]) log-probs: ``(loss, metrics)``.

  ``reduce=False``: metrics as summable ``(total, weight)`` pairs
  (:mod:`bfpo_jax.metrics`).
  """
  flat = lambda x: jnp.reshape(x, -1)  # noqa: E731
  flags = dict(chosen_is_safe=flat(batch["chosen_is_safe"]),
               rejected_is_safe=flat(batch["rejected_is_safe"]))
  args = tuple(map(flat, (*policy, *reference)))
  weights = flat(_pair_weights(batch))
  if step_cfg.stage == "bfpo":
    return losses.bfpo_loss(*args, flags["chosen_is_safe"],
                            flags["rejected_is_safe"], beta=step_cfg.beta,
                            alpha=step_cfg.alpha, b1=step_cfg.b1,
                            weights=weights, reduce=reduce)
  if step_cfg.stage == "dpo":
    return losses.dpo_loss(*args, beta=step_cfg.beta,
                           label_smoothing=step_cfg.label_smoothing,
                           weights=weights, reduce=reduce, **flags)
  if step_cfg.stage == "ipo":
    return losses.ipo_loss(*args, beta=step_cfg.beta, weights=weights,
                           reduce=reduce, **flags)
  raise ValueError(f"preference_loss: stage {step_cfg.stage!r} has no "
                   "preference loss")


def _reference_logps(model_cfg, step_cfg, state, batch, mesh):
  if step_cfg.precomputed_reference:
    return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
  return jax.lax.stop_gradient(pair_logps(
      model_cfg, step_cfg, reference_params(state, step_cfg), batch, mesh))


def _preference_term(model_cfg, step_cfg, state, params, batch, mesh):
  """The stage's preference loss on ``batch`` (a mean over its pairs) and its
  metrics as sums and weights, with the policy's mean log-probs and mean
  logits per side."""
  with jax.named_scope("policy"):
    policy, mean_logits = pair_logps(model_cfg, step_cfg, params, batch, mesh,
                                     with_logits=True)
  with jax.named_scope("reference"):
    reference = _reference_logps(model_cfg, step_cfg, state, batch, mesh)
  loss, stats = preference_loss(step_cfg, policy, reference, batch,
                                reduce=False)
  weights = _pair_weights(batch)
  for side, logps, logits in zip(("chosen", "rejected"), policy, mean_logits):
    stats[f"logps/{side}"] = metrics_lib.mean(logps, weights)
    stats[f"logits/{side}"] = metrics_lib.mean(logits, weights)
  return loss, stats


def microbatch_loss(trainable, state, batch, denominators, *, model_cfg,
                    step_cfg, mesh=None):
  """This microbatch's share of the full-batch loss, and its metrics.

  With a buffer the full-batch loss is ``mean(main) + buffer_weight *
  mean(buffer)``, each mean over its own batch (the reference's rule).
  Metrics of a preference buffer are reported under ``buffer/``.

  Metrics come as summable ``(total, weight)`` pairs (:mod:`bfpo_jax.metrics`):
  summed over microbatches, devices and eval batches, divided once. ``loss``
  is the whole objective per unit of the main stream (pair weight or trained
  token), so batches of different sizes combine as one big batch.
  """
  params = policy_params(state._replace(trainable=trainable), step_cfg)
  main_total, buffer_total = denominators
  if step_cfg.stage == "sft":
    with jax.named_scope("policy"):
      loss, stats = _sft_term(model_cfg, step_cfg, params, batch, mesh)
  else:
    loss, stats = _preference_term(model_cfg, step_cfg, state, params, batch,
                                   mesh)
  main_size = stats.pop("loss").weight
  total = loss * (main_size / main_total)
  if step_cfg.buffer_weight and "buffer" in batch:
    buffer = batch["buffer"]
    buffer_size = _size(buffer, step_cfg.buffer_task)
    if step_cfg.buffer_task == "preference":
      buffer_loss, buffer_stats = _preference_term(
          model_cfg, step_cfg, state, params, buffer, mesh)
      del buffer_stats["loss"]
      stats.update({f"buffer/{k}": v for k, v in buffer_stats.items()})
    else:
      buffer_loss, _ = _sft_term(model_cfg, step_cfg, params, buffer, mesh)
    total = total + (step_cfg.buffer_weight * buffer_loss
                     * (buffer_size / buffer_total))
    stats["buffer_loss"] = metrics_lib.Metric(buffer_loss * buffer_size,
                                              buffer_size)
  stats["loss"] = metrics_lib.Metric(total * main_total, main_size)
  return total, stats


def combine_metrics(metrics_A):
  """Full-batch metric values from per-microbatch ``(total, weight)`` pairs
  stacked along a leading axis [A]: sum both, divide once."""
  return metrics_lib.values(metrics_lib.merge(metrics_A))


def _split_microbatches(batch, n, mesh):
  def reshape(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} is not divisible into "
                       f"{n} microbatches")
    # Row i goes to microbatch i % n: each device's contiguous block of the
    # batch stays on that device for every microbatch (no all-to-all).
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, sharding.BATCH_AXES)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x
  return jax.tree.map(reshape, batch)


def _accumulate(fn, state, batch, step_cfg, mesh):
  """Sums gradients and stacks metrics over microbatches in a scan."""
  denominators = _denominators(batch, step_cfg)
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  if step_cfg.accumulation_steps == 1:
    (_, metrics), grads = grad_fn(state.trainable, state, batch, denominators)
    return grads, metrics_lib.values(metrics)

  def body(grads, microbatch):
    (_, metrics), g = grad_fn(state.trainable, state, microbatch, denominators)
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
  microbatches = _split_microbatches(batch, step_cfg.accumulation_steps, mesh)
  grads, metrics_A = jax.lax.scan(body, zeros, microbatches)
  return grads, combine_metrics(metrics_A)


def train_step(state: TrainState, batch, *, model_cfg, step_cfg, optimizer,
               mesh=None):
  """One optimizer step. Returns ``(new_state, metrics)``.

  A non-finite loss or gradient leaves params and optimizer state unchanged
  (``metrics['nonfinite'] == 1``); the step counter still advances.
  """
  fn = functools.partial(microbatch_loss, model_cfg=model_cfg, step_cfg=step_cfg,
                         mesh=mesh)
  grads, metrics = _accumulate(fn, state, batch, step_cfg, mesh)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  with jax.named_scope("optimizer"):
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
  keep = lambda new, old: jax.tree.map(  # noqa: E731
      lambda n, o: jnp.where(finite, n, o), new, old)
  metrics["grad_norm"] = grad_norm
  metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
  new_state = state._replace(step=state.step + 1,
                             trainable=keep(trainable, state.trainable),
                             opt_state=keep(opt_state, state.opt_state))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model_cfg, step_cfg, mesh=None,
              reduce=True):
  """The same loss and metrics as :func:`train_step`, without updating.

  ``reduce=False`` returns them as ``(total, weight)`` pairs, to sum over many
  eval batches before dividing (:func:`bfpo_jax.metrics.values`).
  """
  _, stats = microbatch_loss(state.trainable, state, batch,
                             _denominators(batch, step_cfg),
                             model_cfg=model_cfg, step_cfg=step_cfg, mesh=mesh)
  return metrics_lib.values(stats) if reduce else stats


def reference_logps_step(state: TrainState, batch, *, model_cfg, step_cfg,
                         mesh=None):
  """Reference log-probs of a preference batch, to precompute them once."""
  return pair_logps(model_cfg, step_cfg, reference_params(state, step_cfg),
                    batch, mesh)


# --------------------------------------------------------------------------- #
# Shardings and builders
# --------------------------------------------------------------------------- #


def state_shardings(mesh, model_cfg, abstract_state: TrainState, optimizer,
                    step_cfg: StepConfig, rules=sharding.DEFAULT_RULES):
  """NamedShardings for every leaf of a TrainState, from logical axes."""
  axis_sizes = dict(mesh.shape)
  specs = sharding.param_specs(model_cfg, axis_sizes, rules)
  hole = lambda x: x is None  # noqa: E731
  like = lambda tree: jax.tree.map(  # noqa: E731
      lambda x, s: None if x is None else s, tree, specs, is_leaf=hole)
  if step_cfg.mode == "lora":
    trainable = sharding.lora_specs(specs, abstract_state.trainable)
  else:
    trainable = like(abstract_state.trainable)
  rep = PartitionSpec()
  opt = optax.tree_utils.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, trainable,
      transform_non_params=lambda _: rep, is_leaf=hole)
  reference = abstract_state.reference
  if reference is not None:
    reference = (sharding.lora_specs(specs, reference)
                 if step_cfg.mode == "lora" else like(reference))
  spec_state = TrainState(rep, trainable, like(abstract_state.frozen),
                          reference, opt)
  return sharding.named(mesh, spec_state)


def create_state(params, optimizer, step_cfg: StepConfig, model_cfg, *,
                 mask=None, pattern=None, lora_rank=16, rng=None, mesh=None,
                 rules=sharding.DEFAULT_RULES, lora=None):
  """Builds the TrainState, directly sharded over ``mesh`` when given.

  ``lora``: adapters to start a LoRA run from (see :func:`init_state`).

  Returns:
    ``(state, shardings)``; ``shardings`` is None without a mesh.
  """
  mask = trainable_mask(params, step_cfg.mode, pattern) if mask is None else mask
  init = functools.partial(init_state, mask=mask, optimizer=optimizer,
                           step_cfg=step_cfg, lora_rank=lora_rank, rng=rng)
  if mesh is None:
    return jax.jit(init)(params, lora=lora), None
  shardings = state_shardings(mesh, model_cfg,
                              jax.eval_shape(init, params, lora=lora),
                              optimizer, step_cfg, rules)
  param_shardings = sharding.named(mesh, sharding.param_specs(
      model_cfg, dict(mesh.shape), rules))
  params = jax.device_put(params, param_shardings)
  if lora is not None:
    lora = jax.device_put(lora, shardings.trainable)
  return jax.jit(init, out_shardings=shardings)(params, lora=lora), shardings


def build_train_step(model_cfg, step_cfg: StepConfig, optimizer, *, mesh=None,
                     shardings=None):
  """``step(state, batch) -> (state, metrics)``, jitted, state donated."""
  fn = functools.partial(train_step, model_cfg=model_cfg, step_cfg=step_cfg,
                         optimizer=optimizer, mesh=mesh)
  if mesh is None:
    return jax.jit(fn, donate_argnums=0)
  fn = sharding.with_activation_sharding(fn, mesh)
  return jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def build_eval_step(model_cfg, step_cfg: StepConfig, *, mesh=None,
                    shardings=None, reduce=True):
  """``eval(state, batch) -> metrics``, jitted; nothing donated.

  ``reduce=False``: metrics as ``(total, weight)`` pairs (see
  :func:`eval_step`).
  """
  fn = functools.partial(eval_step, model_cfg=model_cfg, step_cfg=step_cfg,
                         mesh=mesh, reduce=reduce)
  if mesh is None:
    return jax.jit(fn)
  fn = sharding.with_activation_sharding(fn, mesh)
  return jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
