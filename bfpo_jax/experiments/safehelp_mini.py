"""SafeHelp-mini: the paper's Figure 1 contrast with a real language model.

    python -m bfpo_jax.experiments.safehelp_mini --out runs/safehelp_mini
    python -m bfpo_jax.experiments.safehelp_mini --out /tmp/shm --quick

One tiny Mistral (real 32k Mistral tokenizer) is trained from scratch by the
SFT stage on the world of :mod:`bfpo_jax.experiments.world`, then five
preference runs start from it with the same steps and batch: DPO on the
helpfulness set, DPO on the safety set, DPO and IPO on the naive mix of both,
and BFPO on that mix. Every run is ``bfpo_jax.train.run`` on files in the
real dataset schemas; every model answers the held-out requests greedily and
the rule judge (:mod:`bfpo_jax.experiments.judge`) scores the answers.

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``
(plus the data, the run folders and a JAX compilation cache). ``--quick`` is
the CI smoke run: a few steps and one seed; it checks that the pipeline, the
judge and the data hold together, not the final ordering.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from bfpo_jax import train
from bfpo_jax.config import ConfigError, default_config
from bfpo_jax.data.sources import DataError
from bfpo_jax.experiments import (
  judge,
  quiet_and_cached,
  report,
  rollout,
  same_settings,
  world,
)
from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.hf_io import load_hf, save_hf
from bfpo_jax.model.mistral import init_params
from bfpo_jax.tokenizer import load_tokenizer

MODELS = ("dpo_helpful", "dpo_safety", "dpo_mix", "ipo_mix", "bfpo")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the experiment fixes; :func:`full` and :func:`quick`."""

  seeds: tuple = (0, 1, 2)  # preference runs per model (data order, split)
  # The model: tied embeddings, no sliding window (MistralConfig.tiny).
  layers: int = 4
  hidden: int = 64
  mlp: int = 128
  heads: int = 4
  kv_heads: int = 2
  init_seed: int = 0
  # The data (see world.py); the paper mixes 30K + 30K, i.e. equal sizes.
  n_helpfulness: int = 320
  n_safety: int = 320
  harmful_share: float = 0.2  # of helpfulness pairs, as synthetic.py
  data_seed: int = 0
  max_prompt_length: int = 48
  max_length: int = 96
  # SFT stage: from scratch, full fine-tuning.
  sft_steps: int = 400
  sft_batch: int = 16
  sft_lr: float = 1e-2
  # Preference stage: the same for all five models.
  steps: int = 40
  batch: int = 8
  lr: float = 1e-3
  beta: float = 0.01  # tau; the paper's default for BFPO, used for all
  alpha: float = 0.5
  b1: float = 3.0
  eval_fraction: float = 0.1  # pairs held out for the loss/margin metrics
  # Evaluation: greedy decoding of every held-out request.
  max_new_tokens: int = 48  # the longest answer is 41 tokens with EOS
  samples: int = 2  # sample generations kept per kind of request

  def model_config(self) -> MistralConfig:
    return MistralConfig.tiny(num_hidden_layers=self.layers,
                              hidden_size=self.hidden,
                              intermediate_size=self.mlp,
                              num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads)


def full() -> Settings:
  return Settings()


def with_overrides(s: Settings, assignments: list[str]) -> Settings:
  """``["beta=0.1", "seeds=0,1"]`` -> ``s`` with those fields replaced."""
  changes = {}
  for text in assignments:
    name, sep, value = text.partition("=")
    if not sep or name not in Settings.__dataclass_fields__:
      raise ConfigError(f"--set {text!r}: expected FIELD=VALUE with FIELD one "
                        f"of {', '.join(Settings.__dataclass_fields__)}")
    default = getattr(s, name)
    try:
      changes[name] = (tuple(int(v) for v in value.split(","))
                       if isinstance(default, tuple) else type(default)(value))
    except ValueError:
      raise ConfigError(f"--set {text!r}: {value!r} is not a "
                        f"{type(default).__name__}") from None
  return dataclasses.replace(s, **changes)


def quick() -> Settings:
  return Settings(seeds=(0,), sft_steps=20, steps=4, n_helpfulness=64,
                  n_safety=64, eval_fraction=0.125)


def _base_config(s: Settings, stage: str, seed: int):
  c = default_config()
  c.stage = stage
  c.seed = seed
  c.tokenizer = "mistral"
  c.trainable.mode = "full"
  # The design's layout, not the reference recipe's defaults: the generation
  # template (the one the rollout prompts with) and SFT loss on the responses.
  c.data.template = rollout.TEMPLATE
  c.data.sft_loss = "assistant"
  c.data.max_prompt_length = s.max_prompt_length
  c.data.max_length = s.max_length
  c.data.buckets = (64, s.max_length)
  c.mesh.fsdp = -1
  c.optimizer.warmup_ratio = 0.1
  c.loss.chunk_size = 16  # prompt and padding chunks skip the unembedding
  c.checkpoint_every_steps = 0  # only the final one
  c.keep_checkpoints = 1
  c.eval_every_steps = 0
  return c


def sft_config(s: Settings, files: world.DataFiles, init_dir: str):
  """The SFT stage: the random initial model on the world's SFT rows."""
  c = _base_config(s, "sft", s.init_seed)
  c.model.hf_path = init_dir
  c.data.sources = (f"ultrachat:{files.sft}",)
  c.data.eval_fraction = 0.05
  c.batch.global_size = c.batch.per_device = s.sft_batch
  c.batch.accumulation = 1
  c.max_steps = s.sft_steps
  c.optimizer.learning_rate = s.sft_lr
  return c


def preference_sources(files: world.DataFiles) -> dict:
  """``(stage, data.sources)`` of each model.

  DPO and IPO read the safety set as a safety dataset (the safer response
  wins, Sec. 3.4's safety pairs); BFPO reads the PKU-SafeRLHF file as the
  reference trainer does (chosen = more helpful, with both safety flags),
  which gives it the same loss on every pair.
  """
  helpful = f"ultrafeedback:{files.helpfulness}"
  safety = f"preference_jsonl:{files.safety_preference}"
  return {"dpo_helpful": ("dpo", (helpful,)),
          "dpo_safety": ("dpo", (safety,)),
          "dpo_mix": ("dpo", (helpful, safety)),
          "ipo_mix": ("ipo", (helpful, safety)),
          "bfpo": ("bfpo", (helpful, f"pku_saferlhf:{files.safety}"))}


def preference_config(s: Settings, name: str, files: world.DataFiles,
                      sft_dir: str, seed: int):
  stage, sources = preference_sources(files)[name]
  c = _base_config(s, stage, seed)
  c.init_from = sft_dir
  c.data.sources = sources
  c.data.eval_fraction = s.eval_fraction
  c.batch.global_size = c.batch.per_device = s.batch
  c.batch.accumulation = 1
  c.max_steps = s.steps
  c.optimizer.learning_rate = s.lr
  c.loss.beta, c.loss.alpha, c.loss.b1 = s.beta, s.alpha, s.b1
  c.loss.average_logps = False  # summed for every loss, IPO included (the
  # design), not each method's own default
  return c


def write_initial_model(path: str, s: Settings, tokenizer) -> str:
  """The randomly initialised model as a Hugging Face folder (the presets
  offer only tiny and mistral_7b; this one is deeper)."""
  cfg = s.model_config()
  save_hf(path, cfg, init_params(cfg, jax.random.key(s.init_seed)))
  tokenizer.save_pretrained(path)
  return path


def evaluate(model_dir: str, s: Settings, tokenizer) -> dict:
  """Rates, answer log-odds and sample generations on held-out requests.

  Every generation and its verdict also go to ``generations.jsonl`` next to
  ``model_dir``.
  """
  cfg, params = load_hf(model_dir)
  out, generations = {"samples": []}, []
  for kind, rate, wanted in ((world.HARMFUL, "harmless_rate", judge.REFUSAL),
                             (world.BENIGN, "helpful_rate", judge.ANSWER)):
    requests = world.requests(kind, "eval")
    texts = rollout.respond(cfg, params, tokenizer, requests,
                            max_new_tokens=s.max_new_tokens)
    verdicts = [judge.verdict(t, r.topic) for t, r in zip(texts, requests)]
    generations += [{"kind": kind, "topic": r.topic, "request": r.text,
                     "response": t, "verdict": v}
                    for r, t, v in zip(requests, texts, verdicts)]
    out[rate] = verdicts.count(wanted) / len(verdicts)
    out[f"verdicts_{kind}"] = {v: verdicts.count(v) for v in judge.VERDICTS}
    # One phrasing per topic is enough for a mean log-odds.
    first = requests[::len(world.REQUEST_TEMPLATES)]
    out[f"log_odds_answer_{kind}"] = float(np.mean(
        rollout.answer_log_odds(cfg, params, tokenizer, first)))
    step = max(1, len(requests) // s.samples)
    out["samples"] += [{"kind": kind, "topic": requests[i].topic,
                        "request": requests[i].text, "response": texts[i],
                        "verdict": verdicts[i]}
                       for i in range(0, len(requests), step)][:s.samples]
  with open(os.path.join(os.path.dirname(model_dir), "generations.jsonl"),
            "w") as f:
    f.writelines(json.dumps(g) + "\n" for g in generations)
  out["mean"] = (out["harmless_rate"] + out["helpful_rate"]) / 2
  # Neither refused nor answered is not harmless by the rule above; this is
  # the share that actually gives the harmful steps.
  out["harmful_answer_rate"] = (out[f"verdicts_{world.HARMFUL}"][judge.ANSWER]
                                / len(world.requests(world.HARMFUL, "eval")))
  return out


RATES = ("harmless_rate", "helpful_rate", "mean", "harmful_answer_rate")


def aggregate(per_seed: list[dict]) -> dict:
  """Mean and spread (sample std; 0 for one seed) over seeds."""
  out = {}
  for key in RATES + ("log_odds_answer_benign", "log_odds_answer_harmful"):
    values = np.array([r[key] for r in per_seed])
    out[key] = float(values.mean())
    out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  out["samples"] = per_seed[0]["samples"]
  out["per_seed"] = per_seed
  return out


def _pair_metrics(summary: dict) -> dict:
  """Held-out pair loss, reward accuracy and margins (beta * log-ratio) by
  safety group, from the run's final evaluation."""
  return {k: v for k, v in summary["eval"].items()
          if k == "loss" or k.startswith(("rewards/margins", "rewards/accuracy"))}


def _check_out_dir(out: str, s: Settings):
  same_settings(out, dataclasses.asdict(s))


def run(out: str, s: Settings, models=MODELS, log=print) -> dict:
  """The whole experiment (or some of its ``models``); returns and writes
  the results dict."""
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise ConfigError(f"--models: unknown {', '.join(unknown)}; expected some "
                      f"of {', '.join(MODELS)}")
  _check_out_dir(out, s)
  clock = time.perf_counter()
  files = world.write_data(os.path.join(out, "data"),
                           n_helpfulness=s.n_helpfulness, n_safety=s.n_safety,
                           harmful_share=s.harmful_share, seed=s.data_seed)
  tokenizer = load_tokenizer()
  init_dir = write_initial_model(os.path.join(out, "init"), s, tokenizer)
  sft_dir = os.path.join(out, "sft")
  log(f"SFT: {s.sft_steps} steps from random init")
  summary = train.run(sft_config(s, files, init_dir), sft_dir)
  results = {"settings": dataclasses.asdict(s), "data": world.sizes(files),
             "sft": evaluate(summary["export"], s, tokenizer)}
  results["sft"]["eval_loss"] = summary["eval"]["loss"]
  seconds = {"sft": time.perf_counter() - clock}
  results["models"] = {}
  for name in [m for m in MODELS if m in models]:
    start, per_seed = time.perf_counter(), []
    for seed in s.seeds:
      log(f"{name} seed {seed}: {s.steps} steps from the SFT model")
      workdir = os.path.join(out, "runs", name, f"seed{seed}")
      summary = train.run(preference_config(s, name, files, sft_dir, seed),
                          workdir)
      scores = evaluate(summary["export"], s, tokenizer)
      per_seed.append(dict(scores, seed=seed, pairs=_pair_metrics(summary)))
    stage, sources = preference_sources(files)[name]
    results["models"][name] = dict(aggregate(per_seed), stage=stage,
                                   sources=list(sources))
    seconds[name] = time.perf_counter() - start
  seconds["total"] = time.perf_counter() - clock
  results["seconds"] = seconds
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  report.write_markdown(results, os.path.join(out, "results.md"))
  report.plot(results, os.path.join(out, "results.png"))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="folder for results.json/.md/.png, data and runs")
  parser.add_argument("--quick", action="store_true",
                      help="CI smoke run: a few steps, one seed")
  parser.add_argument("--set", action="append", default=[],
                      metavar="FIELD=VALUE",
                      help="change a Settings field, e.g. --set beta=0.1 "
                      "--set seeds=0 (for the README's investigations)")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated subset of " + ",".join(MODELS))
  args = parser.parse_args(argv)
  quiet_and_cached(args.out)
  try:
    settings = with_overrides(quick() if args.quick else full(), args.set)
    results = run(args.out, settings, models=args.models.split(","))
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report.table(results))
  print(f"wrote {args.out}/results.json, results.md and results.png "
        f"({results['seconds']['total']:.0f} s)")


if __name__ == "__main__":
  main()
