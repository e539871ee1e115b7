"""The jitted work of the evaluation backend: scoring rows and decoding prompts.

One :class:`Engine` holds a model placed on a mesh the way training places it
(weights over ``fsdp`` and ``tensor`` by :mod:`bfpo_jax.sharding`'s rules,
rows of every batch over ``data`` x ``fsdp``, activations pinned to rows) and
two kinds of compiled function, one per shape it meets:

* ``score``: final hidden states (:func:`bfpo_jax.model.apply_hidden`), the
  scored positions' gathered, then the chunked log-probs with argmax flags
  per device on its own rows
  (:func:`bfpo_jax.logprobs.chunked_token_logps_and_greedy`; no [B, T, V]
  logits, and no logits at all for context tokens).
* ``prefill`` / ``decode``: :mod:`bfpo_jax.model.generate`'s KV-cache decoding,
  run ``segment`` tokens at a time so a batch stops as soon as every row has
  ended (EOS or a stop string, checked on the host between segments).

Dimension names (R rows, Y scored tokens, P prompt tokens, E generated
tokens) are listed in :mod:`bfpo_jax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from bfpo_jax import logprobs, sharding
from bfpo_jax.model.generate import decode, prefill
from bfpo_jax.model.mistral import apply_hidden, unembedding


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _score(params, input_ids, segment_ids, positions, labels, score_mask, *,
           cfg, chunk_size, mesh):
  hidden_RxTxD = apply_hidden(cfg, params, input_ids, segment_ids=segment_ids)
  w_DxV = unembedding(cfg, params).astype(cfg.dtype)

  def per_device(h_RxTxD, w, positions_RxY, y, m):
    # Only scored positions reach the unembedding (a continuation is often
    # a tenth of its row).
    h_RxYxD = jnp.take_along_axis(h_RxTxD, positions_RxY[..., None], axis=1)
    return logprobs.chunked_token_logps_and_greedy(h_RxYxD, w, y, mask=m,
                                                   chunk_size=chunk_size)

  rows = PartitionSpec(sharding.BATCH_AXES)
  # Per device on its own rows, the output matrix gathered whole: as in
  # train_step.sequence_logps, XLA would otherwise all-reduce every chunk's
  # logits over the model width.
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(rows, PartitionSpec(), rows, rows, rows),
                       out_specs=(rows, rows),
                       axis_names=frozenset(sharding.BATCH_AXES))(
                           hidden_RxTxD, w_DxV, positions, labels, score_mask)


class Engine:
  """A model on a mesh, with its compiled scoring and decoding functions.

  Args:
    cfg: the model's MistralConfig (compute dtype included).
    params: its params, already placed on ``param_shardings``.
    mesh: a ``(data, fsdp, tensor)`` mesh from :func:`sharding.make_mesh`.
    chunk_size: tokens per log-prob chunk.
    segment: tokens decoded between two stop checks.
  """

  def __init__(self, cfg, params, mesh, *, chunk_size=64, segment=32):
    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.segment = segment
    self.rows_sharding = sharding.batch_sharding(mesh)
    self.data_parallel = int(np.prod([mesh.shape[a]
                                      for a in sharding.BATCH_AXES]))
    self.shapes: set[tuple] = set()  # every (function, shape) compiled
    pinned = lambda fn: sharding.with_activation_sharding(fn, mesh)  # noqa: E731
    self._score = jax.jit(pinned(functools.partial(
        _score, cfg=cfg, chunk_size=chunk_size, mesh=mesh)))
    self._prefill = jax.jit(pinned(functools.partial(prefill, cfg)),
                            static_argnums=3)
    self._decode = jax.jit(pinned(functools.partial(decode, cfg)),
                           static_argnames="num_steps", donate_argnums=1)

  def _rows(self, x):
    """A host array [R, ...] (the same on every process) as a global array."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.rows_sharding,
                                        lambda index: x[index])

  def score(self, batch):
    """``(logps [R, Y] float32, greedy [R, Y] bool)`` of a batching.Batch."""
    self.shapes.add(("score",) + batch.input_ids.shape
                    + batch.score_positions.shape[1:])
    logps, greedy = self._score(
        self.params, self._rows(batch.input_ids),
        self._rows(batch.segment_ids), self._rows(batch.score_positions),
        self._rows(batch.labels), self._rows(batch.score_mask))
    return _to_host(logps), _to_host(greedy)

  def generate(self, input_ids_RxP, mask_RxP, max_new_tokens: int, *,
               finished: Callable[[int, np.ndarray], bool], rng,
               temperature=0.0, top_p=1.0, eos_token_id, pad_token_id,
               active=None):
    """Decodes left-padded prompts until every active row has finished.

    Args:
      input_ids_RxP: prompts, padded on the left.
      mask_RxP: 1 on real tokens.
      max_new_tokens: at most this many tokens per row.
      finished: ``finished(row, tokens)`` says whether a row's generated
        tokens so far end it (e.g. they hold a stop string); EOS always does.
      rng: PRNG key for sampling.
      temperature: 0 for greedy decoding.
      top_p: nucleus mass when sampling.
      eos_token_id: ends a row; pad_token_id fills it afterwards.
      pad_token_id: see above.
      active: optional [R] bool; inactive rows (batch padding) are not waited
        for.

    Returns:
      [R, E] generated tokens: E is a whole number of segments, fewer than
      ``max_new_tokens`` when every row ended early, else at least that many
      (only the first ``max_new_tokens`` count).
    """
    r, p = input_ids_RxP.shape
    segment = min(self.segment, max_new_tokens)
    steps = -(-max_new_tokens // segment) * segment
    self.shapes.add(("prefill", r, p, p + steps))
    state = self._prefill(self.params, self._rows(input_ids_RxP),
                          self._rows(np.asarray(mask_RxP, bool)), p + steps,
                          rng)
    done = np.zeros(r, bool) if active is None else ~np.asarray(active)
    pieces = []
    for _ in range(steps // segment):
      self.shapes.add(("decode", r, p + steps, segment))
      state, tokens = self._decode(self.params, state, jnp.float32(temperature),
                                   jnp.float32(top_p), jnp.int32(eos_token_id),
                                   jnp.int32(pad_token_id),
                                   num_steps=segment)
      pieces.append(_to_host(tokens))
      so_far = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
      for row in np.flatnonzero(~done):
        done[row] = (eos_token_id in so_far[row]
                     or so_far.shape[1] >= max_new_tokens
                     or finished(row, so_far[row]))
      if done.all():
        break
    return np.concatenate(pieces, axis=1)
