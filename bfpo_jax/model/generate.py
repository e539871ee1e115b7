"""Incremental decoding with a KV cache, jitted with fixed shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bfpo_jax.model.mistral import bind, default_positions, unembedding


def init_cache(cfg, batch_size, max_length, dtype=None):
  """Zeroed per-layer key/value buffers [B, S, K, H]."""
  shape = (batch_size, max_length, cfg.num_key_value_heads, cfg.dim_per_head)
  dtype = dtype or cfg.dtype
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
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
  """Greedy when ``temperature == 0``, else nucleus sampling at ``top_p``."""
  greedy = jnp.argmax(logits_BxV, axis=-1)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (always the top token).
  n_keep = jnp.sum(cumulative - jax.nn.softmax(sorted_desc, -1) < top_p, -1)
  threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], -1)
  scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  sampled = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(cfg, params, input_ids, attention_mask, rng, temperature, top_p,
              eos_token_id, pad_token_id, *, max_new_tokens):
  b, t = input_ids.shape
  total = t + max_new_tokens
  key_valid = jnp.zeros((b, total), bool).at[:, :t].set(attention_mask)
  positions = default_positions(attention_mask)
  logits, caches = forward_with_cache(cfg, params, input_ids, positions,
                                      key_valid, 0, init_cache(cfg, b, total))
  state = (logits[:, -1], caches, key_valid, positions[:, -1],
           jnp.zeros((b,), bool), rng)

  def step(state, index):
    logits_BxV, caches, key_valid, last_pos, done, rng = state
    rng, key = jax.random.split(rng)
    token = sample_token(logits_BxV, key, temperature, top_p)
    token = jnp.where(done, pad_token_id, token)
    done = done | (token == eos_token_id)
    key_valid = key_valid.at[:, index].set(True)
    last_pos = last_pos + 1
    logits, caches = forward_with_cache(cfg, params, token[:, None],
                                        last_pos[:, None], key_valid, index,
                                        caches)
    return (logits[:, -1], caches, key_valid, last_pos, done, rng), token

  _, new_tokens = jax.lax.scan(step, state, t + jnp.arange(max_new_tokens))
  return jnp.concatenate([input_ids, new_tokens.T], axis=1)


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
