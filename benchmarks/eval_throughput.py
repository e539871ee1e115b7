"""The harness backends side by side: requests/s of bfpo_jax against hf.

    python benchmarks/eval_throughput.py --json runs/bench/eval_throughput.json

One tiny random float32 Mistral saved as an HF folder (the real 32k Mistral
tokenizer), one set of requests built from the bundled UltraChat rows, sent
to the lm-evaluation-harness's ``hf`` backend (PyTorch ``transformers``) and
to ``bfpo_jax`` (packed rows, its default, and bucketed rows):

* ``loglikelihood``: multiple-choice questions, 4 answers each (a user turn as
  context, assistant sentences as the choices);
* ``loglikelihood_rolling``: whole assistant replies;
* ``generate_until``: greedy answers to user turns, ``max_gen_toks`` tokens,
  stopping at a blank line.

Each backend runs in its own child process; each kind of request is sent
twice in a row: ``cold`` (the first call, where JAX compiles its shapes) and
``warm`` (the same requests again). ``OUT.json`` holds seconds and requests/s
per backend and kind, the overall warm and cold requests/s, the ratios
``bfpo_jax / hf``, and the shapes bfpo_jax compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
BACKENDS = {"hf": ("hf", ""), "bfpo_jax": ("bfpo_jax", ",packing=True"),
            "bfpo_jax_bucketed": ("bfpo_jax", ",packing=False")}


def make_folder(path, shape):
  import torch
  import transformers

  from bfpo_jax.model.tokenizer import load_tokenizer

  torch.manual_seed(0)
  config = transformers.MistralConfig(
      vocab_size=32000, max_position_embeddings=4096, sliding_window=None,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **shape)
  transformers.MistralForCausalLM(config).save_pretrained(path)
  load_tokenizer().save_pretrained(path)


def make_requests(n_questions, n_documents, n_prompts, max_gen_toks):
  """``{kind: [args, ...]}`` from the bundled UltraChat rows."""
  path = os.path.join(ROOT, "bfpo_jax", "data", "tiny", "ultrachat_200k.jsonl")
  with open(path) as f:
    chats = [json.loads(line)["messages"] for line in f]
  users = [m["content"] for c in chats for m in c if m["role"] == "user"]
  replies = [m["content"] for c in chats for m in c if m["role"] == "assistant"]
  sentences = [s.strip() + "." for r in replies for s in r.split(".")
               if s.strip()]
  loglikelihood = []
  for i in range(n_questions):
    context = f"Question: {users[i % len(users)]}\nAnswer:"
    for j in range(4):
      loglikelihood.append((context, " " + sentences[(7 * i + j) %
                                                     len(sentences)]))
  rolling = [(" ".join(replies[i % len(replies):][:3]),)
             for i in range(n_documents)]
  until = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
  generate = [(f"User: {users[(3 * i) % len(users)]}\nAssistant:", until)
              for i in range(n_prompts)]
  return {"loglikelihood": loglikelihood, "loglikelihood_rolling": rolling,
          "generate_until": generate}


def child(backend, folder, requests, batch_size, max_length):
  from lm_eval.api.instance import Instance
  from lm_eval.api.registry import get_model

  import bfpo_jax.evaluate  # noqa: F401

  name, extra = BACKENDS[backend]
  args = (f"pretrained={folder},dtype=float32,batch_size={batch_size},"
          f"max_length={max_length}" + extra)
  if name == "hf":
    args += ",device=cpu"
  lm = get_model(name).create_from_arg_string(args)
  out = {}
  for kind, rows in requests.items():
    instances = [Instance(kind, {}, tuple(a), i) for i, a in enumerate(rows)]
    seconds = []
    for _ in range(2):  # cold, then warm
      tick = time.perf_counter()
      getattr(lm, kind)(instances, disable_tqdm=True)
      seconds.append(time.perf_counter() - tick)
    out[kind] = {"requests": len(rows), "cold_s": seconds[0],
                 "warm_s": seconds[1]}
  shapes = sorted(lm.engine.shapes) if name == "bfpo_jax" else []
  print(json.dumps({"kinds": out, "compiled_shapes": shapes}))


def summarise(per_backend):
  summary = {}
  for backend, result in per_backend.items():
    kinds = result["kinds"]
    n = sum(k["requests"] for k in kinds.values())
    summary[backend] = {
        "compiled_shapes": result["compiled_shapes"],
        "per_kind": {kind: dict(v, warm_requests_per_s=v["requests"] / v["warm_s"],
                                cold_requests_per_s=v["requests"] / v["cold_s"])
                     for kind, v in kinds.items()},
        "warm_requests_per_s": n / sum(k["warm_s"] for k in kinds.values()),
        "cold_requests_per_s": n / sum(k["cold_s"] for k in kinds.values())}
  hf = summary["hf"]
  for backend in ("bfpo_jax", "bfpo_jax_bucketed"):
    mine = summary[backend]
    summary[f"ratio_{backend}_to_hf"] = {
        "warm": mine["warm_requests_per_s"] / hf["warm_requests_per_s"],
        "cold": mine["cold_requests_per_s"] / hf["cold_requests_per_s"],
        "per_kind_warm": {k: mine["per_kind"][k]["warm_requests_per_s"]
                          / hf["per_kind"][k]["warm_requests_per_s"]
                          for k in mine["per_kind"]}}
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--questions", type=int, default=256)
  parser.add_argument("--documents", type=int, default=32)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--max_gen_toks", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_length", type=int, default=512)
  for key, value in SHAPE.items():
    parser.add_argument(f"--{key}", type=int, default=value)
  parser.add_argument("--child", nargs=2, metavar=("BACKEND", "FOLDER"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  requests = make_requests(args.questions, args.documents, args.prompts,
                           args.max_gen_toks)
  if args.child:
    child(args.child[0], args.child[1], requests, args.batch_size,
          args.max_length)
    return
  shape = {k: getattr(args, k) for k in SHAPE}
  sys.path.insert(0, ROOT)  # make_folder imports bfpo_jax
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  per_backend = {}
  with tempfile.TemporaryDirectory() as folder:
    make_folder(folder, shape)
    for backend in BACKENDS:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", backend,
             folder] + [x for k in ("questions", "documents", "prompts",
                                    "max_gen_toks", "batch_size", "max_length")
                        for x in (f"--{k}", str(getattr(args, k)))]
      out = subprocess.run(cmd, capture_output=True, text=True, env=env)
      if out.returncode:
        sys.exit(f"{backend} failed:\n{out.stderr[-3000:]}")
      per_backend[backend] = json.loads(out.stdout.strip().splitlines()[-1])
  summary = summarise(per_backend)
  summary.update(shape=shape, batch_size=args.batch_size,
                 max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                 requests={k: len(v) for k, v in requests.items()},
                 machine=f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores",
                 date=time.strftime("%Y-%m-%d"))
  print(json.dumps(summary, indent=2))
  if args.json:
    profiling.write_json(summary, args.json)


if __name__ == "__main__":
  main()
