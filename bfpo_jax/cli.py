"""``bfpo-jax``: one command for every tool of the package.

    bfpo-jax train --config configs/tiny.py --dry_run
    bfpo-jax data --source ultrafeedback:data/uf.jsonl --report r.json
    bfpo-jax experiment synthetic --out runs/synthetic

Each subcommand is its ``python -m`` module, run as ``python -m`` runs it
(``runpy``, as ``__main__``), with the rest of the command line passed on
unchanged: ``bfpo-jax train ...`` is ``python -m bfpo_jax.train ...``.
``bfpo-jax --help`` lists them; ``bfpo-jax COMMAND --help`` is the module's
own help. A subcommand whose module this installation lacks says so in one
line (exit code 2).
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

PROG = "bfpo-jax"
# name -> (module, one line for --help)
COMMANDS = {
    "train": ("bfpo_jax.train",
              "train one stage (sft, bfpo, dpo, ipo) from a config; "
              "--dry_run prints the plan"),
    "evaluate": ("bfpo_jax.evaluate",
                 "lm-evaluation-harness tasks or the SafeHelp suite on a model"),
    "data": ("bfpo_jax.data",
             "read, validate and tokenize data sources; report or dump them"),
    "convert": ("bfpo_jax.model.convert",
                "convert a GGUF file into a Hugging Face folder"),
    "merge": ("bfpo_jax.merge",
              "interpolate the weights of two models into a new folder"),
}
# experiment NAME -> (module, one line)
EXPERIMENTS = {
    "synthetic": ("bfpo_jax.synthetic",
                  "the paper's illustrative experiment (Sec. 3.4), in a minute"),
    "safehelp_mini": ("bfpo_jax.experiments.safehelp_mini",
                      "Figure 1's contrast with a tiny model trained from "
                      "scratch"),
    "safehelp_real": ("bfpo_jax.experiments.safehelp_real",
                      "Figure 1's contrast on a real pretrained chat model"),
}


def usage() -> str:
  width = max(map(len, [*COMMANDS, "experiment NAME"])) + 2
  lines = [f"usage: {PROG} COMMAND [ARGS...]", "",
           "Bi-Factorial Preference Optimization (BFPO) in JAX. Each command "
           "is its `python -m`", "module; ARGS go to it unchanged "
           f"(`{PROG} COMMAND --help` shows its own).", "", "commands:"]
  lines += [f"  {name:{width}s}{text}  [{module}]"
            for name, (module, text) in COMMANDS.items()]
  lines.append(f"  {'experiment NAME':{width}s}run an experiment; NAME is one "
               "of:")
  lines += [f"    {name:{width - 2}s}{text}  [{module}]"
            for name, (module, text) in EXPERIMENTS.items()]
  return "\n".join(lines)


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _available(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def run_module(module: str, name: str, argv: list[str]) -> int:
  """Runs ``module`` as ``python -m module`` with ``argv`` after it."""
  if not _available(module):
    return _fail(f"{PROG} {name}: {module} is not in this installation of "
                 "bfpo_jax")
  saved = sys.argv
  sys.argv = [module, *argv]  # runpy puts the module's path in argv[0]
  try:  # its sys.exit(code) ends the command, as under python -m
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  finally:
    sys.argv = saved
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv:
    print(usage(), file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name == "experiment":
    if not rest or rest[0] not in EXPERIMENTS:
      given = f" {rest[0]!r}" if rest else ""
      return _fail(f"{PROG} experiment: unknown experiment{given}; NAME is one "
                   f"of {', '.join(EXPERIMENTS)}")
    name = f"experiment {rest[0]}"
    module, rest = EXPERIMENTS[rest[0]][0], rest[1:]
  elif name in COMMANDS:
    module = COMMANDS[name][0]
  else:
    return _fail(f"{PROG}: unknown command {name!r}; commands: "
                 f"{', '.join([*COMMANDS, 'experiment'])} (see {PROG} --help)")
  return run_module(module, name, rest)


def entry_point() -> None:
  """The console script (``[project.scripts]``)."""
  sys.exit(main())
