"""One BFPO step, timed in bfpo-jax and in the PyTorch reference computation.

    python benchmarks/step_throughput.py --json runs/bench/throughput.json
    python benchmarks/step_throughput.py --model models/smollm2-135m-instruct \
        --mode lora --json runs/bench/smollm2_lora.json

``--model DIR`` runs both sides on a real model's weights (an HF folder, e.g.
SmolLM2-135M-Instruct converted by ``bfpo_jax.model.convert``) instead of a
random Mistral of ``SHAPE``; ``--mode lora`` trains LoRA adapters (rank 16 on
q/k/v/o; the reference is the base with the adapters off: ``peft`` with
``disable_adapter()`` on the torch side, as TRL does) instead of every
block's ``down_proj``.

Both sides do the same work on the same shapes: a Mistral with the real
32k vocabulary; a batch of chosen/rejected pairs run as one [2B, T] forward;
summed response log-probs; the BFPO loss; a frozen reference forward;
backward; AdamW on every block's down_proj only (the paper's PEFT set).

* jax: ``bfpo_jax.train_step`` (chunked log-probs, split trainable tree, the
  reference as frozen leaves + initial down_proj).
* torch: what the reference trainer (trl DPOTrainer subclass) computes per
  step: ``transformers.MistralForCausalLM`` policy with ``requires_grad`` on
  down_proj only, a deep-copied reference model under ``no_grad``, full
  logits -> log_softmax -> gather, ``torch.optim.AdamW``.

Each framework runs in its own child process (so peak RSS is its own);
warm-up steps (compilation) are excluded; the median of the timed steps is
reported. ``OUT.json`` holds ``jax_tokens_per_s``, ``torch_tokens_per_s``,
``ratio`` (jax / torch), peak RSS of each, and the shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import profiling

SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             pairs=4, seq_len=256, prompt_len=64, chunk_size=256)


def _batch(shape, seed=0):
  import numpy as np

  rng = np.random.default_rng(seed)
  b, t, p = shape["pairs"], shape["seq_len"], shape["prompt_len"]
  batch = {}
  for side in ("chosen", "rejected"):
    ids = rng.integers(3, shape["vocab_size"], (b, t)).astype(np.int32)
    ids[:, :p] = rng.integers(3, shape["vocab_size"], (1, p))  # shared prompt
    batch[f"{side}_input_ids"] = ids
    batch[f"{side}_attention_mask"] = np.ones((b, t), bool)
    loss = np.zeros((b, t), bool)
    loss[:, p:] = True
    batch[f"{side}_loss_mask"] = loss
  batch["chosen_is_safe"] = np.array([True, True, False, False][:b] * (b // 4 or 1))
  batch["rejected_is_safe"] = np.array([True, False, True, False][:b] * (b // 4 or 1))
  return batch


def _model_fields(shape):
  return {k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads")}


LORA_RANK, LORA_ALPHA = 16, 32.0


def time_jax(shape, warmup, reps, profile_dir=None, remat="none", model=None,
             mode="selective"):
  import jax
  import optax

  from bfpo_jax import train_step as ts
  from bfpo_jax.model import MistralConfig, init_params, load_hf

  run = dict(remat=remat != "none",
             remat_policy="full" if remat == "none" else remat)
  if model:
    cfg, params = load_hf(model, **run)
  else:
    cfg = MistralConfig(**_model_fields(shape), sliding_window=None,
                        tie_word_embeddings=False, **run)
    params = init_params(cfg, jax.random.key(0))
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.01, mode=mode,
                           chunk_size=shape["chunk_size"], accumulation_steps=1,
                           lora_scale=LORA_ALPHA / LORA_RANK)
  optimizer = optax.adamw(5e-7)
  state, _ = ts.create_state(params, optimizer, step_cfg, cfg,
                             lora_rank=LORA_RANK)
  batch = jax.device_put(_batch(shape))
  jitted = ts.build_train_step(cfg, step_cfg, optimizer)
  step = (profiling.compile_and_dump(jitted, (state, batch), profile_dir)
          if profile_dir else jitted.lower(state, batch).compile())
  times = []
  for i in range(warmup + reps):
    tick = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - tick)
  if profile_dir:
    profiling.trace(step, state, batch, profile_dir)
  return times, float(metrics["loss"])


def time_torch(shape, warmup, reps, model=None, mode="selective"):
  import contextlib
  import copy

  import torch
  import transformers

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  if model:
    policy = transformers.AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="sdpa").train()
  else:
    config = transformers.MistralConfig(**_model_fields(shape),
                                        sliding_window=None,
                                        tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    policy = transformers.MistralForCausalLM(config).train()
  if mode == "lora":  # TRL with a PeftModel: the reference is adapters off
    import peft

    policy = peft.get_peft_model(policy, peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    reference, adapters_off = policy, policy.disable_adapter
  else:
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    adapters_off = contextlib.nullcontext
    for name, p in policy.named_parameters():
      p.requires_grad_("mlp.down_proj" in name)
  optimizer = torch.optim.AdamW([p for p in policy.parameters()
                                 if p.requires_grad], lr=5e-7)
  np_batch = _batch(shape)
  cat = lambda k: torch.from_numpy(  # noqa: E731
      __import__("numpy").concatenate([np_batch[f"chosen_{k}"],
                                       np_batch[f"rejected_{k}"]]))
  ids, attention, mask = (cat("input_ids").long(), cat("attention_mask").long(),
                          cat("loss_mask"))
  labels, mask = ids[:, 1:], mask[:, 1:].float()
  s_w = torch.from_numpy(np_batch["chosen_is_safe"]).float()
  s_l = torch.from_numpy(np_batch["rejected_is_safe"]).float()
  beta, alpha, b1 = 0.01, 0.5, 3.0
  b3 = 1 / (b1 - 1)
  target = (b1 * b3 * s_w - b3 * s_l - alpha) / beta
  n = shape["pairs"]

  def logps(model):
    logits = model(ids, attention_mask=attention).logits[:, :-1].float()
    per_token = torch.gather(logits.log_softmax(-1), 2,
                             labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)

  times = []
  for i in range(warmup + reps):
    tick = time.perf_counter()
    pi = logps(policy)
    with torch.no_grad(), adapters_off():
      ref = logps(reference)
    h = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
    loss = ((h - target) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - tick)
  return times, float(loss)


def child(framework, shape, warmup, reps, profile_dir, remat, model, mode):
  if framework == "jax":
    times, loss = time_jax(shape, warmup, reps, profile_dir, remat, model,
                           mode)
  else:
    times, loss = time_torch(shape, warmup, reps, model, mode)
  tokens = 2 * shape["pairs"] * shape["seq_len"]
  print(json.dumps({
      "median_step_s": statistics.median(times),
      "tokens_per_s": tokens / statistics.median(times),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "loss": loss, "times": times}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--profile", help="jax.profiler trace folder")
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                      help="jax side: rematerialise blocks (model.remat_policy)")
  for key, value in SHAPE.items():
    parser.add_argument(f"--{key}", type=int, default=value)
  parser.add_argument("--model", help="an HF folder: its real weights on "
                      "both sides (its architecture replaces SHAPE's model "
                      "fields)")
  parser.add_argument("--mode", default="selective",
                      choices=["selective", "lora"],
                      help="train every block's down_proj, or LoRA on q/k/v/o")
  parser.add_argument("--framework", choices=["jax", "torch"],
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  shape = {k: getattr(args, k) for k in SHAPE}
  if args.model:  # token ids must fit the model's vocabulary
    with open(os.path.join(args.model, "config.json")) as f:
      shape["vocab_size"] = json.load(f)["vocab_size"]
  if args.framework:
    child(args.framework, shape, args.warmup, args.reps, args.profile,
          args.remat, args.model, args.mode)
    return
  results = {}
  for framework in ("jax", "torch"):
    cmd = [sys.executable, os.path.abspath(__file__), "--framework", framework,
           "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--remat", args.remat, "--mode", args.mode]
    if args.model:
      cmd += ["--model", os.path.abspath(args.model)]
    cmd += [x for k, v in shape.items() for x in (f"--{k}", str(v))]
    if args.profile and framework == "jax":
      cmd += ["--profile", args.profile]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep
               + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
      sys.exit(f"{framework} benchmark failed:\n{out.stderr[-3000:]}")
    results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
  summary = {
      "jax_tokens_per_s": results["jax"]["tokens_per_s"],
      "torch_tokens_per_s": results["torch"]["tokens_per_s"],
      "ratio": results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"],
      "jax_peak_rss_mib": results["jax"]["peak_rss_mib"],
      "torch_peak_rss_mib": results["torch"]["peak_rss_mib"],
      "jax_loss": results["jax"]["loss"], "torch_loss": results["torch"]["loss"],
      "jax_median_step_s": results["jax"]["median_step_s"],
      "torch_median_step_s": results["torch"]["median_step_s"],
      "shape": shape, "model": args.model or "random Mistral of shape",
      "mode": args.mode, "remat": args.remat, "warmup": args.warmup,
      "reps": args.reps,
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores",
      "date": time.strftime("%Y-%m-%d"),
  }
  print(json.dumps(summary, indent=2))
  if args.json:
    profiling.write_json(summary, args.json)


if __name__ == "__main__":
  main()
