"""A real chat model on real prompts: sampled and greedy responses, judged,
and how far a model's answers drift from the start model's.

Prompts are rendered with the model's own chat template exactly as training
renders a preference prompt (``data.template=tokenizer``:
:meth:`bfpo_jax.data.chat_template.TemplateTokenizer.encode_prompt`), left
padded to a few fixed lengths and cut into batches of one fixed size, so each
(batch, length) shape compiles once. Decoding is
:func:`bfpo_jax.model.generate` (greedy at temperature 0, else sampling at
top-p 1, which skips the sort over the vocabulary).
"""

from __future__ import annotations

import jax
import numpy as np

from bfpo_jax.data.chat_template import TemplateTokenizer
from bfpo_jax.data.sources import Skip
from bfpo_jax.experiments import refusal, rollout
from bfpo_jax.model import generate

PROMPT_BUCKETS = (96, 160, 256, 512)  # left-padded prompt lengths


def _bucket(n: int) -> int:
  """The padded length of a batch whose longest row has ``n`` tokens: a
  bucket, or beyond the last a multiple of it (few shapes, any length)."""
  for b in PROMPT_BUCKETS:
    if n <= b:
      return b
  return -(-n // PROMPT_BUCKETS[-1]) * PROMPT_BUCKETS[-1]


def messages(prompt: str, system: str | None = None) -> list[dict]:
  head = [] if system is None else [{"role": "system", "content": system}]
  return head + [{"role": "user", "content": prompt}]


def respond(cfg, params, tokenizer, conversations: list[list[dict]], *,
            max_new_tokens: int, batch_size: int, temperature: float = 0.0,
            seed: int = 0, prefill: str = "") -> list[str]:
  """The model's response text to each conversation (up to its EOS).

  Args:
    conversations: message lists ending with a user turn.
    max_new_tokens: tokens generated per response.
    batch_size: rows per call (the last batch is padded with copies).
    temperature: 0 for greedy decoding, else sampling (top-p 1).
    seed: sampling seed (each batch folds in its index).
    prefill: text the response starts with, written after the generation
      prompt; the returned text includes it.

  Returns:
    One string per conversation, special tokens removed.
  """
  chat = TemplateTokenizer(tokenizer)
  eos = tokenizer.eos_token_id
  head = chat.ids(prefill) if prefill else []
  rows = [chat.encode_prompt(c) + head for c in conversations]
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  texts = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    chunk = [rows[i] for i in index]
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    length = _bucket(max(map(len, chunk)))
    ids = np.full((batch_size, length), eos, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for r, row in enumerate(chunk):
      ids[r, length - len(row):] = row
      mask[r, length - len(row):] = True
    out = np.asarray(generate(
        cfg, params, ids, mask, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=1.0,
        rng=jax.random.fold_in(jax.random.key(seed), start),
        eos_token_id=eos, pad_token_id=eos))[:, length:]
    for r, i in enumerate(index):
      new = out[r].tolist()
      new = new[:new.index(eos)] if eos in new else new
      texts[i] = prefill + tokenizer.decode(new, skip_special_tokens=True)
  return [t.strip() for t in texts]


def judged(prompts: list[str], texts: list[str]) -> list[str]:
  """The judge's verdict (:data:`refusal.VERDICTS`) of each response."""
  return [refusal.verdict(p, t) for p, t in zip(prompts, texts)]


def mean_token_logps(cfg, params, tokenizer, prompts: list[str],
                     responses: list[str], *, batch_size: int) -> np.ndarray:
  """[R] mean log-prob per response token of each response under ``params``
  (the response as :meth:`TemplateTokenizer.encode_pair` lays it out after
  its prompt, end-of-turn tokens included); NaN where the text cannot be
  laid out (it spells a special token)."""
  chat = TemplateTokenizer(tokenizer)
  rows, starts, kept = [], [], []
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    try:
      head, body, _ = chat.encode_pair(messages(prompt), response, response)
    except Skip:  # text spelling a special token: no log-prob, NaN below
      continue
    rows.append(head + body)
    starts.append(len(head))
    kept.append(i)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk, first = rows[start:start + batch_size], starts[start:start
                                                           + batch_size]
    real = len(chunk)
    chunk, first = chunk + [chunk[-1]] * (batch_size - real), first + [
        first[-1]] * (batch_size - real)
    length = _bucket(max(map(len, chunk)))
    ids = np.full((batch_size, length), tokenizer.eos_token_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for r, row in enumerate(chunk):
      ids[r, :len(row)], mask[r, :len(row)] = row, True
    loss = mask & (np.arange(length)[None] >= np.array(first)[:, None])
    out.append(np.asarray(rollout.response_logps(
        cfg, params, ids, mask, loss, average=True, chunk_size=64))[:real])
  values = np.full(len(prompts), np.nan, np.float32)
  if out:
    values[kept] = np.concatenate(out)
  return values
