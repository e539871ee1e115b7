"""Zephyr chat template, tokenized with exact prompt/response boundaries.

Text layout (Zephyr's template; every turn ends with EOS)::

    <s><|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{response}</s>

Tokens are built turn by turn so that: EOS is always the real EOS id and text
a user typed (say a literal ``</s>``) never becomes a special token; the
prompt's tokens are a prefix of both the chosen and the rejected sequence; and
the ids equal those of tokenizing the rendered text in one piece (as
alignment-handbook does), because each later segment is encoded behind a
``"\\n"`` whose tokens are then dropped (SentencePiece adds a word-start
marker only at the start of an encode call).

Truncation: the prompt keeps BOS and its last ``max_prompt_length - 1``
tokens; the response is cut on the right to fit ``max_length`` (a cut
response has no EOS: it did not end there).
"""

from __future__ import annotations

from bfpo_jax.data.sources import Skip


class ChatTokenizer:
  """Wraps a ``transformers`` tokenizer with the Zephyr template."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = tokenizer.eos_token_id
    if self.bos_id is None or self.eos_id is None:
      raise ValueError("tokenizer needs bos_token_id and eos_token_id")
    self._newline = self._encode("\n")

  def _encode(self, text):
    return self.tok(text, add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]

  def encode_continuation(self, text):
    """Ids of ``text`` as it tokenizes in the middle of a document."""
    ids = self._encode("\n" + text)
    n = len(self._newline)
    if ids[:n] == self._newline:
      return ids[n:]
    return self._encode(text)

  def encode_turns(self, messages):
    """[BOS] + each turn (``<|role|>\\n{content}`` + EOS), and a mask of the
    assistant contents+EOS (the tokens an SFT loss trains on)."""
    ids, mask = [self.bos_id], [False]
    for i, m in enumerate(messages):
      header = f"<|{m['role']}|>\n"
      if m["role"] == "assistant":
        head = (self._encode(header) if i == 0
                else self.encode_continuation("\n" + header))
        body = self.encode_continuation(m["content"]) + [self.eos_id]
        ids += head + body
        mask += [False] * len(head) + [True] * len(body)
      else:
        text = header + m["content"]
        turn = (self._encode(text) if i == 0
                else self.encode_continuation("\n" + text)) + [self.eos_id]
        ids += turn
        mask += [False] * len(turn)
    return ids, mask

  def encode_prompt(self, messages):
    """Prompt turns followed by the ``<|assistant|>\\n`` generation header."""
    ids, _ = self.encode_turns(messages)
    return ids + self.encode_continuation("\n<|assistant|>\n")

  def encode_response(self, text):
    return self.encode_continuation(text) + [self.eos_id]


def _truncate_prompt(ids, max_prompt_length):
  if len(ids) <= max_prompt_length:
    return ids
  return ids[:1] + ids[len(ids) - (max_prompt_length - 1):]


def tokenize_pair(chat: ChatTokenizer, record, *, max_prompt_length=512,
                  max_length=1024):
  """A canonical preference record -> unpadded token lists.

  Returns:
    dict with ``prompt_length``, ``chosen_ids``, ``rejected_ids`` (each
    prompt + response), and the two safety flags. The loss mask of a side is
    ``positions >= prompt_length``. Raises ``Skip('no_room_for_response')``.
  """
  prompt = _truncate_prompt(chat.encode_prompt(record["prompt"]),
                            max_prompt_length)
  room = max_length - len(prompt)
  if room < 1:
    raise Skip("no_room_for_response")
  out = {"prompt_length": len(prompt),
         "chosen_is_safe": bool(record["chosen_is_safe"]),
         "rejected_is_safe": bool(record["rejected_is_safe"])}
  for side in ("chosen", "rejected"):
    out[f"{side}_ids"] = prompt + chat.encode_response(record[side])[:room]
  return out


def tokenize_sft(chat: ChatTokenizer, record, *, max_length=1024):
  """A canonical SFT record -> ``{"input_ids", "loss_mask"}`` lists.

  The loss covers every assistant turn's content and EOS. Cut on the right to
  ``max_length``; raises ``Skip('no_room_for_response')`` when no trained
  token survives.
  """
  ids, mask = chat.encode_turns(record["messages"])
  ids, mask = ids[:max_length], mask[:max_length]
  if not any(mask):
    raise Skip("no_room_for_response")
  return {"input_ids": ids, "loss_mask": mask}
