"""Zephyr chat template, tokenized as the reference trainer's trl does.

The reference (wx-zhang/bfpo) renders messages with alignment-handbook's
Zephyr template, :data:`CHAT_TEMPLATE`: a message is ``<|role|>\\n`` + text +
``</s>`` + ``\\n``. Two layouts of it (``data.template``; the third,
``tokenizer``, renders with the model's own chat template:
:mod:`bfpo_jax.data.chat_template`):

* ``reference`` -- the paper's code. An empty system turn starts every
  conversation that has none. A preference prompt is
  ``<s><|system|>\\n</s>\\n<|user|>\\n{user}</s>\\n``; each response is the
  rendered assistant message ``<|assistant|>\\n{text}</s>\\n`` followed by the
  EOS that trl's DPO tokenizer appends, and every response token is in the
  loss (trl's labels). An SFT example is BOS + every rendered turn + EOS, as
  trl's packing tokenizes it (``add_special_tokens`` adds the BOS, the
  concatenation token is the EOS).
* ``generation`` -- what a model sees at inference: no system turn is added,
  the prompt ends with the generation header ``<|assistant|>\\n`` and a
  response is ``{text}</s>``.

Tokens: the text between the template's EOS tokens is tokenized one segment
at a time, each segment as a fresh SentencePiece document. That is what the
Hub's Mistral-7B-v0.1 / Zephyr ``tokenizer.json`` does to the rendered text in
one piece (it prepends the word marker ``▁`` (28705) to every segment after a
special token), so the ids equal the reference's; and text a user typed (say
a literal ``</s>``) is never a special token. A prompt/response boundary
inside a segment is found as trl's ``build_tokenized_answer`` finds it.

One short pair, ``{"prompt": "Hi", "chosen": "Hello.", "rejected": "No."}``,
with the bundled Mistral-7B-v0.1 tokenizer (tested against this docstring).
``reference`` layout, as ``python -m bfpo_jax.data --dump`` writes it::

    prompt_input_ids   [1, 523, 28766, 6574, 28766, 28767, 13, 2, 28705, 13,
                        28789, 28766, 1838, 28766, 28767, 13, 23809, 2, 28705,
                        13]
    chosen_input_ids   [28789, 28766, 489, 11143, 28766, 28767, 13, 16230,
                        28723, 2, 28705, 13, 2]
    rejected_input_ids [28789, 28766, 489, 11143, 28766, 28767, 13, 2501,
                        28723, 2, 28705, 13, 2]

(``<s>`` ``▁<|system|>\\n`` ``</s>`` ``▁\\n<|user|>\\nHi`` ``</s>`` ``▁\\n`` |
``<|assistant|>\\nHello.`` ``</s>`` ``▁\\n`` ``</s>``); both label masks are
all ones. ``generation`` layout::

    prompt_input_ids   [1, 523, 28766, 1838, 28766, 28767, 13, 23809, 2, 28705,
                        13, 28789, 28766, 489, 11143, 28766, 28767, 13]
    chosen_input_ids   [16230, 28723, 2]
    rejected_input_ids [2501, 28723, 2]

Truncation (``data.truncation``): ``trl`` (the reference's) cuts nothing
unless prompt + the longer response exceed ``max_length``; then the prompt
keeps its last ``max_prompt_length`` tokens (BOS included in the count, so a
cut prompt loses it, as in trl), and if still too long both responses are cut
to ``max_length - max_prompt_length``. ``prompt_first`` always caps the prompt
(BOS kept) and gives the response the rest. A cut response has no EOS.
"""

from __future__ import annotations

from bfpo_jax.data.sources import Skip

TEMPLATES = ("reference", "generation", "tokenizer")
TRUNCATIONS = ("trl", "prompt_first")
SFT_LOSSES = ("all", "assistant")

# alignment-handbook's Zephyr template, as the reference sets it on the
# tokenizer (src/alignment/data.py, DEFAULT_CHAT_TEMPLATE); exports carry it.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}")


class ChatTokenizer:
  """Wraps a ``transformers`` tokenizer with the Zephyr template (the
  ``reference`` and ``generation`` layouts; :func:`make_chat` gives the
  tokenizer's own template for ``tokenizer``)."""

  def __init__(self, tokenizer, template="reference"):
    if template not in TEMPLATES[:2]:
      raise ValueError(f"template must be one of {TEMPLATES[:2]} (or "
                       f"tokenizer, through make_chat), got {template!r}")
    self.tok = tokenizer
    self.template = template
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = tokenizer.eos_token_id
    if self.bos_id is None or self.eos_id is None:
      raise ValueError("tokenizer needs bos_token_id and eos_token_id")

  def encode(self, text):
    """Ids of one segment (text between special tokens), special-token
    strings in it kept as plain text."""
    if not text:
      return []
    return self.tok(text, add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]

  def split(self, head, body):
    """Ids of ``head + body`` as one segment, cut where ``head`` ends.

    When the last token of ``head`` merges with ``body`` the merged token goes
    to the body, as in trl's ``build_tokenized_answer``.
    """
    full = self.encode(head + body)
    head_ids = self.encode(head)
    cut = len(head_ids) if full[:len(head_ids)] == head_ids else len(head_ids) - 1
    return full[:cut], full[cut:]

  def _with_system(self, messages):
    if self.template == "reference" and messages[0]["role"] != "system":
      return [{"role": "system", "content": ""}] + list(messages)
    return list(messages)

  def encode_turns(self, messages):
    """BOS + each turn (``<|role|>\\n{content}`` + EOS), and a mask of the
    assistant contents + their EOS."""
    ids, mask = [self.bos_id], [False]
    for i, m in enumerate(self._with_system(messages)):
      lead = "\n" if i else ""  # the template's newline after the last EOS
      head, body = self.split(f"{lead}<|{m['role']}|>\n", m["content"])
      trained = m["role"] == "assistant"
      ids += head + body + [self.eos_id]
      mask += [False] * len(head) + [trained] * (len(body) + 1)
    return ids, mask

  def encode_pair(self, prompt_messages, chosen, rejected):
    """``(prompt_ids, chosen_ids, rejected_ids)``, responses without prompt.

    Raises ``Skip('prompt_merges_with_response')`` when the two responses
    would need different prompt tokens (a tokenizer merging the prompt's last
    token into the response differently for each).
    """
    prompt, _ = self.encode_turns(prompt_messages)
    head_text, header, suffix = self._response_frame()
    head_c, body_c = self.split(head_text, header + chosen)
    head_r, body_r = self.split(head_text, header + rejected)
    if head_c != head_r:
      raise Skip("prompt_merges_with_response")
    return prompt + head_c, body_c + suffix, body_r + suffix

  def _response_frame(self):
    """``(text before the response, its header, ids after it)``."""
    if self.template == "reference":
      return "\n", "<|assistant|>\n", [self.eos_id] + self.encode("\n") + [
          self.eos_id]
    return "\n<|assistant|>\n", "", [self.eos_id]

  def encode_prompt(self, messages):
    """What a model trained on :meth:`encode_pair` sees before it writes a
    response: the pair's prompt and, in the reference template, the
    ``<|assistant|>\\n`` header the reference trains as part of the response.
    """
    prompt, response, _ = self.encode_pair(messages, "", "")
    return prompt + response[:len(response) - len(self._response_frame()[2])]

  def encode_sft(self, messages):
    """A whole conversation: ``(ids, assistant_mask)``."""
    ids, mask = self.encode_turns(messages)
    if self.template == "reference":  # the rendered text's last "\n", trl's EOS
      tail = self.encode("\n") + [self.eos_id]
      ids, mask = ids + tail, mask + [False] * len(tail)
    return ids, mask


def make_chat(tokenizer, template="reference"):
  """The chat layout of ``data.template``: :class:`ChatTokenizer` (the Zephyr
  template, ``reference`` or ``generation``) or, for ``tokenizer``, the
  model's own chat template
  (:class:`bfpo_jax.data.chat_template.TemplateTokenizer`)."""
  if template == "tokenizer":
    from bfpo_jax.data.chat_template import TemplateTokenizer

    return TemplateTokenizer(tokenizer)
  return ChatTokenizer(tokenizer, template)


def truncate_pair(prompt, chosen, rejected, *, max_prompt_length, max_length,
                  truncation="trl"):
  """Token lists of a pair cut to ``max_length`` (see the module docstring).

  Returns:
    ``(prompt, chosen, rejected)``; raises ``Skip('no_room_for_response')``
    when ``prompt_first`` leaves no response token.
  """
  if truncation == "trl":
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
      prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
      room = max_length - max_prompt_length
      chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected
  if truncation != "prompt_first":
    raise ValueError(f"truncation must be one of {TRUNCATIONS}, got "
                     f"{truncation!r}")
  if len(prompt) > max_prompt_length:
    prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]
  room = max_length - len(prompt)
  if room < 1:
    raise Skip("no_room_for_response")
  return prompt, chosen[:room], rejected[:room]


def tokenize_pair(chat: ChatTokenizer, record, *, max_prompt_length=512,
                  max_length=1024, truncation="trl"):
  """A canonical preference record -> unpadded token lists.

  Returns:
    dict with ``prompt_length``, ``chosen_ids``, ``rejected_ids`` (each
    prompt + response), and the two safety flags. The loss mask of a side is
    ``positions >= prompt_length``.
  """
  prompt, chosen, rejected = truncate_pair(
      *chat.encode_pair(record["prompt"], record["chosen"], record["rejected"]),
      max_prompt_length=max_prompt_length, max_length=max_length,
      truncation=truncation)
  return {"prompt_length": len(prompt), "chosen_ids": prompt + chosen,
          "rejected_ids": prompt + rejected,
          "chosen_is_safe": bool(record["chosen_is_safe"]),
          "rejected_is_safe": bool(record["rejected_is_safe"])}


def tokenize_sft(chat: ChatTokenizer, record, *, max_length=1024, loss="all"):
  """A canonical SFT record -> ``{"input_ids", "loss_mask"}`` lists.

  ``loss="all"`` trains on every token after BOS, as the reference's SFT
  (labels = inputs); ``"assistant"`` on each assistant turn's content and EOS.
  Cut on the right to ``max_length`` (None: never); raises
  ``Skip('no_room_for_response')`` when no trained token survives.
  """
  if loss not in SFT_LOSSES:
    raise ValueError(f"loss must be one of {SFT_LOSSES}, got {loss!r}")
  ids, mask = chat.encode_sft(record["messages"])
  if loss == "all":
    mask = [False] + [True] * (len(ids) - 1)
  if max_length is not None:
    ids, mask = ids[:max_length], mask[:max_length]
  if not any(mask):
    raise Skip("no_room_for_response")
  return {"input_ids": ids, "loss_mask": mask}


def dump_record(example, task):
  """A tokenized example in the ``--dump`` layout (public JSON keys)."""
  if task == "sft":
    return {"input_ids": list(example["input_ids"]),
            "loss_mask": [int(m) for m in example["loss_mask"]]}
  n = example["prompt_length"]
  out = {"prompt_input_ids": list(example["chosen_ids"][:n])}
  for side in ("chosen", "rejected"):
    response = list(example[f"{side}_ids"][n:])
    out[f"{side}_input_ids"] = response
    out[f"{side}_labels_mask"] = [1] * len(response)
  for side in ("chosen", "rejected"):
    out[f"{side}_is_safe"] = bool(example[f"{side}_is_safe"])
  return out
