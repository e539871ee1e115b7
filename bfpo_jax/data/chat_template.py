"""``data.template = "tokenizer"``: the model's own chat template, as TRL uses it.

A chat model is trained in the format it was tuned in: ChatML for SmolLM and
Qwen (``<|im_start|>user\\n...<|im_end|>\\n``, SmolLM adding a default system
prompt when none is given), Llama 3's header tokens, Mistral-Instruct's
``[INST]``. :class:`TemplateTokenizer` renders with the tokenizer's
``chat_template`` exactly as TRL's ``DPOTrainer`` does:

* a preference prompt is the prompt messages rendered with
  ``add_generation_prompt=True``; each response is what the whole
  conversation (prompt + the assistant's answer) adds to it. Both are
  rendered by the same template, so a default system prompt is in both;
* the rendered text is tokenized in one piece, without special tokens added
  (``add_special_tokens=False``): a BOS or end-of-turn token appears exactly
  as often as the template writes it, never doubled;
* an SFT example is the whole conversation; with ``data.sft_loss=assistant``
  the loss covers what each assistant turn adds to the conversation before
  it (its content and the template's end-of-turn tokens).

A row whose prompt rendering is not the start of the conversation's
rendering (a template that writes the prompt differently alone) stops the
data preparation with one line naming the row (:class:`TemplateError`); a
response whose first token merges with the prompt's last is skipped as
``prompt_merges_with_response``; message text that spells a special token
(``<|im_end|>``), which the template's tokenization would read as the token
itself, is skipped as ``special_token_in_text``.
"""

from __future__ import annotations

from bfpo_jax.data.sources import DataError, Skip


class TemplateError(DataError):
  """A row the chat template renders inconsistently (one line, names it)."""


def _row(messages) -> str:
  first = next((m["content"] for m in messages if m["role"] == "user"), "")
  return f"the row whose prompt starts {first[:60]!r}"


class TemplateTokenizer:
  """Tokenizes conversations with ``tokenizer.chat_template`` (TRL's way).

  The same interface as :class:`bfpo_jax.data.tokenize.ChatTokenizer`:
  :meth:`encode_pair`, :meth:`encode_prompt`, :meth:`encode_sft`.
  """

  template = "tokenizer"

  def __init__(self, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
      raise DataError("data.template=tokenizer: the tokenizer has no "
                      "chat_template (use data.template=reference for the "
                      "Zephyr template)")
    if tokenizer.eos_token_id is None:
      raise DataError("data.template=tokenizer: the tokenizer has no EOS "
                      "token (needed for padding and for stopping generation)")
    self.tok = tokenizer
    self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    self.specials = sorted({t for t in tokenizer.all_special_tokens if t}
                           | {t.content for t in decoder.values()
                              if getattr(t, "special", False)})

  def render(self, messages, generation=False) -> str:
    return self.tok.apply_chat_template(list(messages), tokenize=False,
                                        add_generation_prompt=generation)

  def ids(self, text: str) -> list[int]:
    return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

  def _check_text(self, messages):
    for m in messages:
      if any(s in m["content"] for s in self.specials):
        raise Skip("special_token_in_text")

  def _prefix_length(self, head_text, head_ids, full_text, full_ids,
                     messages) -> int:
    """How many leading ``full_ids`` are ``head_text``'s (its ids given)."""
    if not full_text.startswith(head_text):
      raise TemplateError(
          f"data.template=tokenizer: {_row(messages)}: the chat template "
          "renders the conversation's start differently alone than in the "
          "whole conversation, so a response cannot be cut from it")
    if full_ids[:len(head_ids)] != head_ids:
      raise Skip("prompt_merges_with_response")
    return len(head_ids)

  def encode_pair(self, prompt_messages, chosen, rejected):
    """``(prompt_ids, chosen_ids, rejected_ids)``, responses without prompt."""
    self._check_text(list(prompt_messages) + [
        {"role": "assistant", "content": chosen},
        {"role": "assistant", "content": rejected}])
    prompt_text = self.render(prompt_messages, generation=True)
    prompt_ids = self.ids(prompt_text)
    responses = []
    for text in (chosen, rejected):
      conversation = list(prompt_messages) + [
          {"role": "assistant", "content": text}]
      full_text = self.render(conversation)
      full_ids = self.ids(full_text)
      n = self._prefix_length(prompt_text, prompt_ids, full_text, full_ids,
                              conversation)
      responses.append(full_ids[n:])
    return prompt_ids, responses[0], responses[1]

  def encode_prompt(self, messages):
    """The prompt a model sees before it answers (generation prompt on)."""
    return self.ids(self.render(messages, generation=True))

  def encode_sft(self, messages):
    """A whole conversation: ``(ids, assistant_mask)``; the mask covers what
    each assistant turn adds to the conversation before it."""
    self._check_text(messages)
    full_text = self.render(messages)
    full_ids = self.ids(full_text)
    mask = [False] * len(full_ids)
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      bounds = []
      for head in (self.render(messages[:i], generation=True),
                   self.render(messages[:i + 1])):
        bounds.append(self._prefix_length(head, self.ids(head), full_text,
                                          full_ids, messages))
      mask[bounds[0]:bounds[1]] = [True] * (bounds[1] - bounds[0])
    return full_ids, mask
