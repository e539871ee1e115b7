"""Every ``python -m bfpo_jax...`` / ``bfpo-jax ...`` command of the docs, checked.

Run as ``python tests/docs_commands.py TINY_FOLDER OUT_DIR`` (by
tests/test_docs.py): it collects the commands of README.md and docs/*.md
(code blocks, ``\\``-continued lines joined, and inline code), and checks
each one, printing one JSON line per command:

* ``ran``: commands that take seconds run as written (:data:`AS_WRITTEN`;
  paths under ``runs/`` moved into OUT_DIR);
* ``dry_run``: a training command on local data runs with ``--dry_run``
  (config, model, tokenizer, data, mesh, steps, memory: everything before
  the first step);
* ``validated``: a training command on hub datasets has its flags and
  config overrides parsed and the config validated (no data is read);
* ``parsed``: any other command's arguments go through its own parser
  (a renamed or unknown flag, a bad choice or type fails).

Where a command names model weights this machine cannot have (a Hub id, or
the folder an earlier documented step writes), the model is replaced by the
tiny random folder TINY_FOLDER: :data:`SUBSTITUTED` lists the names.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
AS_WRITTEN = ("bfpo-jax --help",
              "python -m bfpo_jax.synthetic --out runs/synthetic",
              "python -m bfpo_jax.sharding --model mistral_7b --mesh fsdp=4",
              "python -m bfpo_jax.experiments.real_prompts --cache .whl")
SUBSTITUTED = ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
               "mistralai/Mistral-7B-v0.1", "models/", "runs/")
"""Model sources replaced by the tiny folder: Hub ids, and the folders an
earlier documented step writes (convert's ``models/``, a stage's ``runs/``)."""
_START = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(python -m bfpo_jax[\w.]*|bfpo-jax|"
                    r"launch/gpu\.sh)(?=\s|$)")
_INLINE = re.compile(r"`((?:\.venv/bin/)?python -m bfpo_jax[^`]*|bfpo-jax [^`]*)`")


class _Parsed(Exception):  # noqa: N818 -- control flow
  pass


def collect() -> list[tuple[str, str]]:
  """``(file, command)`` for every documented command."""
  out = []
  for path in DOCS:
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
      for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if _START.match(line.strip()):
          out.append((os.path.relpath(path, ROOT), line.strip()))
    for span in _INLINE.findall(text):
      out.append((os.path.relpath(path, ROOT), " ".join(span.split())))
  return out


def argv_of(command: str) -> tuple[str, list[str]]:
  """``(module, args)``; optional ``[...]`` groups kept, ``...`` dropped."""
  words = shlex.split(command.replace("$ ", "", 1), comments=True)
  if words[0].endswith("python"):
    module, args = words[2], words[3:]
  elif words[0] == "launch/gpu.sh":  # runs bfpo_jax.train with these flags
    module, args = "bfpo_jax.train", words[1:]
  else:
    module, args = "bfpo_jax.cli", words[1:]
  args = [a.strip("[]") for a in args]
  return module, [a for a in args if a and a.strip(".")]


def _as_cli(module, args):
  """``bfpo-jax SUB ARGS`` -> the subcommand's module and ARGS."""
  from bfpo_jax import cli

  if module != "bfpo_jax.cli" or not args or args[0].startswith("-"):
    return module, args
  if args[0] == "experiment":
    return cli.EXPERIMENTS[args[1]][0], args[2:]
  return cli.COMMANDS[args[0]][0], args[1:]


def _parse_only(module, args):
  real = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, argv=None, namespace=None):
    real(self, argv, namespace)
    raise _Parsed

  argparse.ArgumentParser.parse_args = parse_then_stop
  target = importlib.import_module(module)
  if not hasattr(target, "main"):  # a package: python -m runs its __main__
    target = importlib.import_module(f"{module}.__main__")
  try:
    target.main(args)
  except _Parsed:
    return "parsed"
  except SystemExit as e:
    if e.code:
      raise RuntimeError(f"the parser refused it (exit {e.code})") from None
    return "parsed"  # --help
  finally:
    argparse.ArgumentParser.parse_args = real
  raise RuntimeError("main() returned without parsing its arguments")


def _substitute(config, tiny):
  for field in ("init_from", "model.hf_path"):
    section, _, leaf = field.rpartition(".")
    node = config[section] if section else config
    value = node[leaf]
    if value and (value.startswith(SUBSTITUTED[:3]) or (
        value.startswith(SUBSTITUTED[3:]) and not os.path.exists(value))):
      node[leaf] = tiny


def _train_flags(train, argv):
  """A fresh copy of the training CLI's flags for ``argv`` (absl's are
  parsed once per process; each command here needs its own)."""
  import copy

  from absl import flags
  from ml_collections import config_flags

  fl = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fl,
                                  lock_config=True, sys_argv=argv)
  for flag in flags.FLAGS.get_flags_for_module(train):
    if flag.name != "config":
      fl[flag.name] = copy.deepcopy(flag)
  return fl


def _train(args, tiny, out):
  from absl import flags

  from bfpo_jax import startup, train
  from bfpo_jax.config import validate
  from bfpo_jax.data.sources import SourceSpec

  argv = ["train"] + [a for a in args if a != "--help"]
  fl = _train_flags(train, argv)
  try:
    fl(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = (train._unknown_field(e, args)
               if isinstance(e, AttributeError | KeyError) else e)
    raise RuntimeError(f"bad command line: {message}") from None
  if fl.export_only or fl.config is None:
    return "parsed"
  config = fl.config
  _substitute(config, tiny)
  local = all(os.path.exists(SourceSpec.parse(s).path) for field in (
      "sources", "buffer_sources", "eval_sources") for s in config.data[field])
  if local:
    startup.dry_run(config, os.path.join(out, "dry_run_workdir"))
    return "dry_run"
  mesh = config.mesh
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  validate(config, 1 if -1 in sizes else sizes[0] * sizes[1] * sizes[2])
  return "validated"


def _as_written(command, out):
  module, args = argv_of(command)
  args = [os.path.join(out, a) if a.startswith("runs/") else a for a in args]
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  if result.returncode:
    raise RuntimeError(f"exit {result.returncode}: {result.stderr[-500:]}")
  return "ran"


def _normal(command: str) -> str:
  words = shlex.split(command.replace("$ ", "", 1), comments=True)
  return " ".join([w.replace(".venv/bin/", "") for w in words])


def check(command, tiny, out) -> str:
  if _normal(command) in AS_WRITTEN:
    return _as_written(command, out)
  module, args = _as_cli(*argv_of(command))
  if not args:  # the module named in prose: its --help
    args = ["--help"]
  if module == "bfpo_jax.train":
    return _train(args, tiny, out)
  return _parse_only(module, args)


def main():
  tiny, out = sys.argv[1:3]
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)
  for path, command in collect():
    try:
      how, error = check(command, tiny, out), None
    except Exception as e:  # every failure is reported, then the next runs
      how = "failed"
      error = (str(e).splitlines() or [repr(e)])[0] or traceback.format_exc(
          limit=2)
    print(json.dumps({"file": path, "command": command, "how": how,
                      "error": error}), flush=True)


if __name__ == "__main__":
  main()
