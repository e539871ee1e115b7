"""Incremental decoding with a KV cache, jitted with fixed shapes.

:func:`generate` is the one-call API. :func:`prefill` and :func:`decode` are
its two halves, for callers that decode in segments and stop early (e.g. on
stop strings, as the lm-evaluation-harness backend does).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bfpo_jax.model.mistral import bind, default_positions, pin, unembedding

CACHE_AXES = ("act_batch", None, "act_kv_heads", None)
"""Logical axes of a key/value buffer [B, S, K, H]: rows like activations."""


def init_cache(cfg, batch_size, max_length, dtype=None):
  """Zeroed per-layer key/value buffers [B, S, K, H].

  Under :func:`bfpo_jax.model.mistral.activation_sharding` they are placed
  like the activations (rows over the batch axes), not left to XLA.
  """
  shape = (batch_size, max_length, cfg.num_key_value_heads, cfg.dim_per_head)
  dtype = dtype or cfg.dtype
  return [{"k": pin(jnp.zeros(shape, dtype), CACHE_AXES),
           "v": pin(jnp.zeros(shape, dtype), CACHE_AXES)}
          for _ in range(cfg.num_hidden_layers)]


def forward_with_cache(cfg, params, input_ids_BxT, positions_BxT, key_valid_BxS,
                       start, caches):
  """Runs T new tokens written at buffer index ``start``; float32 logits."""
  model = bind(cfg, params)
  query_index_T = start + jnp.arange(input_ids_BxT.shape[1])
  hidden, caches = model(input_ids_BxT, positions_BxT, key_valid_BxS,
                         query_index_T, caches)
  logits = jnp.dot(hidden, unembedding(cfg, params).astype(cfg.dtype),
                   preferred_element_type=jnp.float32)
  return logits, caches


def sample_token(logits_BxV, rng, temperature, top_p):
  """Greedy when ``temperature == 0``, else nucleus sampling at ``top_p``.

  Both choices are ``lax.cond`` branches, so greedy decoding never pays for
  the sort over the vocabulary (on a CPU, 8 x 32k logits take ~0.1 s to
  sort, 50x an argmax), nor does sampling with ``top_p >= 1``.
  """
  def greedy():
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample():
    scaled = logits_BxV / jnp.maximum(temperature, 1e-6)

    def nucleus():
      sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(sorted_desc, axis=-1)
      # Keep the smallest prefix whose mass reaches top_p (always the top).
      n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, -1)
      threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], -1)
      return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda: scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy)


class DecodeState(NamedTuple):
  """Where decoding stands: what :func:`decode` carries from step to step."""

  logits_BxV: jax.Array  # next-token logits of each row
  caches: list  # per-layer {"k", "v"} [B, S, K, H]
  key_valid_BxS: jax.Array  # cache slots holding a real token
  last_pos_B: jax.Array  # position id of each row's last token
  done_B: jax.Array  # rows that emitted EOS
  rng: jax.Array  # PRNG key for sampling
  index: jax.Array  # cache slot the next token is written to


def prefill(cfg, params, input_ids, attention_mask, total_length, rng):
  """Runs left-padded prompts [B, T] into a fresh cache of ``total_length``.

  Returns the :class:`DecodeState` whose next token goes to slot T.
  """
  b, t = input_ids.shape
  key_valid = jnp.zeros((b, total_length), bool).at[:, :t].set(attention_mask)
  positions = default_positions(attention_mask)
  logits, caches = forward_with_cache(cfg, params, input_ids, positions,
                                      key_valid, 0,
                                      init_cache(cfg, b, total_length))
  return DecodeState(logits[:, -1], caches, key_valid, positions[:, -1],
                     jnp.zeros((b,), bool), rng, jnp.int32(t))


def decode(cfg, params, state: DecodeState, temperature, top_p, eos_token_id,
           pad_token_id, *, num_steps):
  """``num_steps`` tokens per row from ``state``, one step each in a scan.

  Rows that emitted EOS get ``pad_token_id``. Calling it again on the state
  it returns continues where it stopped (the cache must have room).

  Returns:
    ``(state, tokens [B, num_steps])``.
  """
  def step(state, _):
    rng, key = jax.random.split(state.rng)
    token = sample_token(state.logits_BxV, key, temperature, top_p)
    token = jnp.where(state.done_B, pad_token_id, token)
    done = state.done_B | (token == eos_token_id)
    key_valid = state.key_valid_BxS.at[:, state.index].set(True)
    last_pos = state.last_pos_B + 1
    logits, caches = forward_with_cache(cfg, params, token[:, None],
                                        last_pos[:, None], key_valid,
                                        state.index, state.caches)
    return DecodeState(logits[:, -1], caches, key_valid, last_pos, done, rng,
                       state.index + 1), token

  state, tokens_ExB = jax.lax.scan(step, state, None, length=num_steps)
  return state, tokens_ExB.T


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(cfg, params, input_ids, attention_mask, rng, temperature, top_p,
              eos_token_id, pad_token_id, *, max_new_tokens):
  state = prefill(cfg, params, input_ids, attention_mask,
                  input_ids.shape[1] + max_new_tokens, rng)
  _, new_tokens = decode(cfg, params, state, temperature, top_p, eos_token_id,
                         pad_token_id, num_steps=max_new_tokens)
  return jnp.concatenate([input_ids, new_tokens], axis=1)


def generate(cfg, params, input_ids, attention_mask=None, max_new_tokens=32,
             temperature=0.0, top_p=1.0, rng=None, *, eos_token_id=None,
             pad_token_id=None):
  """Generates ``max_new_tokens`` tokens after left-padded prompts.

  The prompt is run once to fill the cache, then one token per step inside a
  ``lax.scan``; shapes are fixed, so one compilation serves every batch of
  the same shape. After a row emits EOS it is filled with ``pad_token_id``.

  Args:
    cfg: the MistralConfig (static).
    params: model params.
    input_ids: [B, T] prompts, padded on the LEFT.
    attention_mask: [B, T], 1 on real tokens (default: all real).
    max_new_tokens: number of tokens to generate (static).
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus mass kept when sampling.
    rng: PRNG key for sampling (default: key 0).
    eos_token_id: stop token (default ``cfg.eos_token_id``).
    pad_token_id: filler after EOS (default ``cfg.pad_token_id`` or EOS).

  Returns:
    [B, T + max_new_tokens] token ids: the prompts followed by the new tokens.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, bool)
  mask = np.asarray(attention_mask).astype(bool)
  if not mask[:, -1].all():
    raise ValueError("generate: prompts must be left-padded (attention_mask "
                     "must be 1 at the last position of every row)")
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  pad = pad_token_id
  if pad is None:
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
  return _generate(cfg, params, input_ids, jnp.asarray(mask),
                   jax.random.key(0) if rng is None else rng,
                   jnp.float32(temperature), jnp.float32(top_p),
                   jnp.int32(eos), jnp.int32(pad),
                   max_new_tokens=max_new_tokens)
