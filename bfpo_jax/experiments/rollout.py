"""A trained model on the world's requests: greedy answers and log-odds.

Prompts are rendered with the project's chat template
(:meth:`bfpo_jax.data.tokenize.ChatTokenizer.encode_prompt`), exactly as the
training pipeline renders a preference prompt.

:func:`greedy_generate` is ``bfpo_jax.model.generate.generate`` at
``temperature=0`` (same cache, same steps; tested equal token for token)
without its sampling branch: ``generate`` sorts the full vocabulary and draws
a categorical sample at every step even when decoding greedily, which on a
CPU makes it about 40x slower for this model (32k vocabulary, d=64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bfpo_jax import logprobs
from bfpo_jax.data.tokenize import ChatTokenizer
from bfpo_jax.experiments import world
from bfpo_jax.model.generate import forward_with_cache, init_cache
from bfpo_jax.model.mistral import apply_hidden, default_positions, unembedding

TEMPLATE = "generation"
"""The chat layout SafeHelp-mini trains and prompts with (``data.template``)."""


def left_pad(rows: list[list[int]], pad_id: int):
  """Token lists -> ``(ids [B, T] int32, mask [B, T] bool)``, padded left."""
  length = max(map(len, rows))
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(cfg, params, input_ids_BxT, attention_mask_BxT, *,
                    max_new_tokens, eos_token_id, pad_token_id):
  """[B, max_new_tokens] greedy continuations of left-padded prompts.

  Rows that emitted EOS are filled with ``pad_token_id`` afterwards, as
  ``generate`` does.
  """
  b, t = input_ids_BxT.shape
  key_valid_BxS = jnp.zeros((b, t + max_new_tokens), bool).at[:, :t].set(
      attention_mask_BxT)
  positions_BxT = default_positions(attention_mask_BxT)
  logits_BxTxV, caches = forward_with_cache(
      cfg, params, input_ids_BxT, positions_BxT, key_valid_BxS, 0,
      init_cache(cfg, b, t + max_new_tokens))

  def step(state, index):
    logits_BxV, caches, key_valid_BxS, last_B, done_B = state
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    token_B = jnp.where(done_B, pad_token_id, token_B)
    done_B = done_B | (token_B == eos_token_id)
    key_valid_BxS = key_valid_BxS.at[:, index].set(True)
    last_B = last_B + 1
    logits_Bx1xV, caches = forward_with_cache(cfg, params, token_B[:, None],
                                              last_B[:, None], key_valid_BxS,
                                              index, caches)
    return (logits_Bx1xV[:, -1], caches, key_valid_BxS, last_B, done_B), token_B

  state = (logits_BxTxV[:, -1], caches, key_valid_BxS, positions_BxT[:, -1],
           jnp.zeros((b,), bool))
  _, tokens_ExB = jax.lax.scan(step, state, t + jnp.arange(max_new_tokens))
  return tokens_ExB.T


def respond(cfg, params, tokenizer, requests: list[world.Request], *,
            max_new_tokens: int, batch_size: int = 128) -> list[str]:
  """The model's greedy response text to each request (up to its EOS)."""
  chat = ChatTokenizer(tokenizer, TEMPLATE)
  eos = tokenizer.eos_token_id
  texts = []
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    ids, mask = left_pad([chat.encode_prompt(r.messages) for r in chunk], eos)
    new = np.asarray(greedy_generate(cfg, params, ids, mask,
                                     max_new_tokens=max_new_tokens,
                                     eos_token_id=eos, pad_token_id=eos))
    for row in new.tolist():
      row = row[:row.index(eos)] if eos in row else row
      texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
  return texts


@functools.partial(jax.jit, static_argnames=("cfg", "average", "chunk_size"))
def response_logps(cfg, params, input_ids_BxT, attention_mask_BxT,
                   loss_mask_BxT, *, average=False, chunk_size=32):
  """[B] log-probs of each row's ``loss_mask`` tokens (summed, or averaged
  per token), via the chunked path."""
  hidden_BxTxD = apply_hidden(cfg, params, input_ids_BxT, attention_mask_BxT)
  w_DxV = unembedding(cfg, params).astype(cfg.dtype)
  return logprobs.chunked_sequence_logps(hidden_BxTxD[:, :-1], w_DxV,
                                         input_ids_BxT[:, 1:],
                                         loss_mask_BxT[:, 1:],
                                         chunk_size=chunk_size, average=average)


def answer_log_odds(cfg, params, tokenizer, requests: list[world.Request]):
  """[R] log P(any answer template) - log P(any refusal template) per request.

  Each template's summed response log-prob (response tokens and EOS, as the
  preference losses count them), log-sum-exp'd within the kind of response.
  Positive: the model leans towards answering that request.
  """
  chat = ChatTokenizer(tokenizer, TEMPLATE)
  rows, prompt_lengths = [], []
  for r in requests:
    for text in ([t.format(topic=r.topic) for t in world.ANSWER_TEMPLATES]
                 + list(world.REFUSAL_TEMPLATES)):
      prompt, response, _ = chat.encode_pair(r.messages, text, text)
      rows.append(prompt + response)
      prompt_lengths.append(len(prompt))
  length = max(map(len, rows))
  ids = np.full((len(rows), length), tokenizer.eos_token_id, np.int32)
  mask = np.zeros(ids.shape, bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  loss_mask = mask & (np.arange(length)[None] >= np.array(prompt_lengths)[:, None])
  logps_RxJ = np.asarray(response_logps(cfg, params, ids, mask, loss_mask)
                         ).reshape(len(requests), -1)
  n_answers = len(world.ANSWER_TEMPLATES)
  lse = lambda x: np.logaddexp.reduce(x, axis=1)  # noqa: E731
  return lse(logps_RxJ[:, :n_answers]) - lse(logps_RxJ[:, n_answers:])
