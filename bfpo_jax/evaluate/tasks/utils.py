"""Prompt extraction for the SafeHelp task YAMLs (the harness calls these)."""

import re

# ALERT wraps each prompt in an Alpaca-style template; the reference removes
# it so that the evaluated model's own chat template applies.
_ALERT_WRAPPER = re.compile(r"### Instruction:\n(.*?)\n### Response:\n", re.DOTALL)


def advbench_behavior(doc) -> str:
  """The behaviour: ``goal`` of llm-attacks' CSV, or ``text`` of a one-per-line
  file such as the reference's advbench.txt."""
  if "goal" not in doc and "text" in doc:
    return doc["text"]
  return doc["goal"]


def advbench_prompt(doc) -> str:
  # The reference's doc_to_text, "{{text}}. ", kept: it is what its numbers saw.
  return advbench_behavior(doc) + ". "


def alert_prompt(doc) -> str:
  """The instruction inside ALERT's wrapper (the whole prompt if unwrapped)."""
  match = _ALERT_WRAPPER.match(doc["prompt"])
  return match.group(1).strip() if match else doc["prompt"].strip()


def challenging(dataset):
  """RealToxicityPrompts rows flagged ``challenging``."""
  return dataset.filter(lambda doc: bool(doc["challenging"]))
