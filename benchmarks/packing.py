"""Pairs per second of the BFPO step: padded pairs against packed pairs.

    python benchmarks/packing.py --json runs/bench/packing.json

The same BFPO step (the throughput benchmark's model shape, selective
``down_proj``, reference forward included, the recipe's safety batch plus a
same-sized helpfulness buffer batch) runs on the same pairs in each layout:

* ``padded_1024``: every batch padded to 1024 (the earlier default buckets);
* ``padded_a100x4``: ``configs/a100x4.py``'s buckets, 256, 512, 1024;
* ``padded_best``: the set of at most four buckets with the fewest padded
  tokens on this length distribution (searched on 400 simulated steps; what
  ``pipeline.DEFAULT_BUCKETS`` was set from);
* ``packed``: ``data.packing`` rows of 2 x 1024 tokens, or of one of
  a100x4's buckets when that gives fewer token slots, 8 pairs at most
  (on CPU its attention skips the tiles the pair mask leaves empty).

Layouts run round-robin, step by step, in one process, so a busy CPU slows
them alike; each shape is compiled before timing. Pairs per second = pairs
of the timed steps / their total time.

Lengths, the paper's 50/50 mix (every step: PKU-SafeRLHF safety pairs and as
many UltraFeedback pairs), cut by the recipe's trl rule at 1024 / 512:

* UltraFeedback: the measured [prompt, chosen, rejected] token lengths of
  1,200 real pairs (``benchmarks/pair_lengths.json`` says where from),
  drawn with replacement.
* PKU-SafeRLHF: no copy of its rows was at hand, so an estimate: question
  and answer texts log-normal with means of 29 and 142 tokens (sigma 0.45
  and 0.5), plus the template's 19 prompt and 11 response tokens. The means
  come from the PKU-SafeRLHF-QA dataset card (131,505,098 bytes over
  149,858 rows: ~745 characters of question + answer once the other columns
  are taken off) at 4.14 characters per token (measured on the UltraFeedback
  sample with the bundled tokenizer), split 1:5 as in the rows at the head
  of PKU-SafeRLHF's ``data/Alpaca-7B/test.jsonl``; the sigmas are assumed.

``OUT.json`` holds ``padded_pairs_per_s`` (the fastest padded layout),
``packed_pairs_per_s``, ``ratio`` (packed / padded), the padding share of
each, every layout's figures, the distribution, and the projected hours of
the paper's BFPO stage (60K pairs) on 4 x A100 per layout, from the model
FLOPs of ``mfu.py`` on the a100x4 batch geometry at an assumed MFU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import profiling  # noqa: E402  (benchmarks/ is the script's folder)
from step_throughput import SHAPE, _model_fields  # noqa: E402

from bfpo_jax.data import packing, pipeline  # noqa: E402
from bfpo_jax.data.tokenize import truncate_pair  # noqa: E402

MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
PKU = dict(prompt_mean=29, prompt_sigma=0.45, response_mean=142,
           response_sigma=0.5, prompt_template=19, response_template=11)
CANDIDATE_BUCKETS = (128, 192, 256, 384, 512, 640, 768, 896)
A100X4_BUCKETS = (256, 512, 1024)
A100_PEAK, STAGE_PAIRS = 312e12, 60_000


def _lognormal(rng, mean, sigma, n):
  """Integers >= 1, log-normal with the given mean and log-space sigma."""
  mu = math.log(mean) - sigma ** 2 / 2
  return np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(int)


def pku_lengths(rng, n):
  """[n, 3] prompt, chosen, rejected tokens of PKU-SafeRLHF-like pairs."""
  p = _lognormal(rng, PKU["prompt_mean"], PKU["prompt_sigma"], n)
  c, r = (_lognormal(rng, PKU["response_mean"], PKU["response_sigma"], n)
          for _ in range(2))
  return np.stack([p + PKU["prompt_template"], c + PKU["response_template"],
                   r + PKU["response_template"]], 1)


def uf_lengths(rng, n):
  with open(os.path.join(HERE, "pair_lengths.json")) as f:
    rows = np.array(json.load(f)["ultrafeedback"])
  return rows[rng.integers(0, len(rows), n)]


def truncated(lengths, max_length=MAX_LENGTH,
              max_prompt_length=MAX_PROMPT_LENGTH):
  """Lengths after the recipe's trl truncation (at 1024 / 512 by default)."""
  out = []
  for p, c, r in lengths:
    cut = truncate_pair([0] * p, [0] * c, [0] * r, max_length=max_length,
                        max_prompt_length=max_prompt_length)
    out.append([len(x) for x in cut])
  return np.array(out)


def examples(lengths, rng, vocab):
  """Tokenized pairs (``tokenize_pair``'s layout) with random token ids."""
  out = []
  for i, (p, c, r) in enumerate(lengths):
    prompt = rng.integers(3, vocab, p).tolist()
    out.append({"prompt_length": int(p),
                "chosen_ids": prompt + rng.integers(3, vocab, c).tolist(),
                "rejected_ids": prompt + rng.integers(3, vocab, r).tolist(),
                "chosen_is_safe": bool(i % 2), "rejected_is_safe": bool(i % 3)})
  return out


def padded_tokens(lengths, buckets):
  """Token slots of one padded batch of these pairs."""
  longest = max(max(p + c, p + r) for p, c, r in lengths)
  return 2 * len(lengths) * pipeline.bucket_length(longest, buckets)


def best_buckets(batches, max_buckets=4):
  """The bucket set (1024 included) with the fewest padded tokens."""
  best = None
  for k in range(max_buckets):
    for extra in itertools.combinations(CANDIDATE_BUCKETS, k):
      buckets = extra + (MAX_LENGTH,)
      tokens = sum(padded_tokens(b, buckets) for b in batches)
      if best is None or tokens < best[0]:
        best = (tokens, buckets)
  return best[1]


def collate(layout, pairs, pad_id=0, rows_multiple=1):
  if layout["kind"] == "packed":
    return packing.pack_pairs(pairs, length=layout["pack_length"],
                              pairs_per_row=layout["pairs_per_row"],
                              rows_multiple=rows_multiple, pad_id=pad_id,
                              buckets=layout["buckets"])
  return pipeline.collate_pairs(pairs, buckets=layout["buckets"], pad_id=pad_id)


def shape_of(batch):
  return tuple(sorted((k, v.shape) for k, v in batch.items()
                      if not isinstance(v, dict)))


def distribution(rng, n=20_000):
  """Length statistics of the two sources, after truncation."""
  out = {}
  for name, sample in (("pku_saferlhf", pku_lengths), ("ultrafeedback",
                                                       uf_lengths)):
    lengths = truncated(sample(rng, n))
    out[name] = {field: {"mean": round(float(lengths[:, i].mean()), 1),
                         "p50": int(np.percentile(lengths[:, i], 50)),
                         "p95": int(np.percentile(lengths[:, i], 95)),
                         "max": int(lengths[:, i].max())}
                 for i, field in enumerate(("prompt", "chosen", "rejected"))}
    out[name]["pair_tokens_mean"] = round(float(lengths.sum(1).mean()), 1)
  out["pku_saferlhf"]["source"] = (
      "estimate: log-normal question/answer lengths, means from the "
      "PKU-SafeRLHF-QA dataset card (bytes per row) at 4.14 characters per "
      "token; see benchmarks/packing.py")
  out["ultrafeedback"]["source"] = (
      "measured: 1,200 pairs of trl-lib/ultrafeedback_binarized under the "
      "reference template and the Mistral tokenizer; benchmarks/"
      "pair_lengths.json")
  out["mix"] = ("every step: one PKU-SafeRLHF batch and one UltraFeedback "
                "batch of the same size (the recipe's buffer stream)")
  out["truncation"] = f"trl rule, max_length {MAX_LENGTH}, max_prompt_length " \
                      f"{MAX_PROMPT_LENGTH}"
  return out


def projection(layouts, rng, steps=100, pairs=32, rows_multiple=16):
  """Hours of the paper's BFPO stage on 4 x A100 per layout, from FLOPs.

  The a100x4 geometry: 32 safety + 32 helpfulness pairs a step, 4 devices x
  4 microbatches (packed rows a multiple of 16); 60K pairs = 937.5 steps.
  """
  import mfu

  from bfpo_jax import trainable
  from bfpo_jax.model import MistralConfig, abstract_params

  cfg = MistralConfig.mistral_7b()
  params = abstract_params(cfg)
  mask = trainable.trainable_mask(params, "selective")
  sampled = [(truncated(pku_lengths(rng, pairs)), truncated(uf_lengths(rng, pairs)))
             for _ in range(steps)]
  out = {}
  for name, layout in layouts.items():
    flops = 0.0
    for batch_lengths in sampled:
      for lengths in batch_lengths:
        if layout["kind"] == "packed":
          length, n_rows, _ = packing.choose_rows(
              [p + c + r + 1 for p, c, r in lengths],
              list(layout["buckets"]) + [layout["pack_length"]],
              layout["pairs_per_row"], rows_multiple)
          flops += mfu.step_flops(cfg, params, mask, n_rows / 2, length)
        else:
          longest = max(max(p + c, p + r) for p, c, r in lengths)
          flops += mfu.step_flops(cfg, params, mask, len(lengths),
                                  pipeline.bucket_length(longest,
                                                         layout["buckets"]))
    total = flops / steps * STAGE_PAIRS / (2 * pairs)
    out[name] = {"flops": float(f"{total:.3g}")}
    for mfu_share in (0.3, 0.4):
      hours = total / (4 * A100_PEAK * mfu_share) / 3600
      out[name][f"hours_at_{int(mfu_share * 100)}pct_mfu"] = round(hours, 2)
  return out


def time_layouts(layouts, step_batches, shape, warmup_note=print):
  """Per layout: seconds of each timed step, programs compiled."""
  import jax
  import optax

  from bfpo_jax import train_step as ts
  from bfpo_jax.model import MistralConfig, init_params

  cfg = MistralConfig(**_model_fields(shape), sliding_window=None,
                      tie_word_embeddings=False)
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.01, mode="selective",
                           chunk_size=shape["chunk_size"], buffer_weight=1.0,
                           buffer_task="preference", accumulation_steps=1)
  optimizer = optax.adamw(5e-7)
  params = init_params(cfg, jax.random.key(0))
  step = ts.build_train_step(cfg, step_cfg, optimizer)
  states, programs, batches = {}, {}, {}
  for name, layout in layouts.items():
    states[name] = ts.create_state(params, optimizer, step_cfg, cfg)[0]
    batches[name] = [dict(collate(layout, main), buffer=collate(layout, buffer))
                     for main, buffer in step_batches]
    seen = {}
    for batch in batches[name]:  # compile each shape before timing
      key = (shape_of(batch), shape_of(batch["buffer"]))
      if key not in seen:
        states[name], _ = step(states[name], batch)
        jax.block_until_ready(states[name])
        seen[key] = True
    programs[name] = len(seen)
    warmup_note(f"{name}: {len(seen)} programs compiled")
  times = {name: [] for name in layouts}
  for k in range(len(step_batches)):
    for name in layouts:
      tick = time.perf_counter()
      states[name], metrics = step(states[name], batches[name][k])
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - tick)
  return times, programs, batches


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--steps", type=int, default=6, help="timed steps")
  parser.add_argument("--pairs", type=int, default=4,
                      help="safety pairs per step (and as many helpfulness)")
  parser.add_argument("--pairs_per_row", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "chunk_size"):
    parser.add_argument(f"--{key}", type=int, default=SHAPE[key])
  args = parser.parse_args(argv)
  shape = {k: getattr(args, k) for k in SHAPE if k in _model_fields(SHAPE)
           or k == "chunk_size"}
  rng = np.random.default_rng(args.seed)
  simulated = [b for _ in range(400) for b in (
      truncated(pku_lengths(rng, args.pairs)), truncated(uf_lengths(rng, args.pairs)))]
  layouts = {
      "padded_1024": {"kind": "padded", "buckets": (MAX_LENGTH,)},
      "padded_a100x4": {"kind": "padded", "buckets": A100X4_BUCKETS},
      "padded_best": {"kind": "padded", "buckets": best_buckets(simulated)},
      "packed": {"kind": "packed", "pack_length": 2 * MAX_LENGTH,
                 "pairs_per_row": args.pairs_per_row,
                 "buckets": A100X4_BUCKETS},
  }
  step_batches = [(examples(truncated(pku_lengths(rng, args.pairs)), rng,
                            args.vocab_size),
                   examples(truncated(uf_lengths(rng, args.pairs)), rng,
                            args.vocab_size)) for _ in range(args.steps)]
  times, programs, batches = time_layouts(
      layouts, step_batches, shape,
      warmup_note=lambda s: print(s, file=sys.stderr, flush=True))
  pairs = 2 * args.pairs * args.steps
  results = {}
  for name, layout in layouts.items():
    flat = [b for batch in batches[name] for b in (batch, batch["buffer"])]
    slots = sum(b["input_ids" if "input_ids" in b else "chosen_input_ids"].size
                * (1 if "input_ids" in b else 2) for b in flat)
    results[name] = {
        **{k: v for k, v in layout.items() if k != "kind"},
        "pairs_per_s": pairs / sum(times[name]),
        "median_step_s": float(np.median(times[name])),
        "padding_share": float(np.mean([packing.padding_share(b) for b in flat])),
        "token_slots_per_step": slots / args.steps,
        "programs": programs[name], "step_s": times[name]}
  padded = max((n for n in results if n.startswith("padded")),
               key=lambda n: results[n]["pairs_per_s"])
  summary = {
      "padded_pairs_per_s": results[padded]["pairs_per_s"],
      "packed_pairs_per_s": results["packed"]["pairs_per_s"],
      "ratio": results["packed"]["pairs_per_s"] / results[padded]["pairs_per_s"],
      "padded_layout": padded,
      "padded_padding_share": results[padded]["padding_share"],
      "packed_padding_share": results["packed"]["padding_share"],
      "layouts": results,
      "distribution": distribution(np.random.default_rng(args.seed + 1)),
      "projection_a100x4_bfpo_stage": projection(
          layouts, np.random.default_rng(args.seed + 2)),
      "default_buckets": list(pipeline.DEFAULT_BUCKETS),
      "shape": shape, "pairs_per_step": 2 * args.pairs, "steps": args.steps,
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores",
      "date": time.strftime("%Y-%m-%d"),
  }
  print(json.dumps({k: v for k, v in summary.items() if k != "layouts"},
                   indent=2))
  if args.json:
    profiling.write_json(summary, args.json)


if __name__ == "__main__":
  main()
