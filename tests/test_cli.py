"""``bfpo-jax``: one command whose subcommands are the ``python -m`` modules.

Where the package is installed (``make test``'s venv installs it editable)
the console script itself is run; in a development venv without the
install, ``python -m bfpo_jax``, the same entry point."""

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib

import pytest

from bfpo_jax import cli
from tests.helpers import ROOT

TINY = os.path.join(ROOT, "bfpo_jax", "data", "tiny")


def _installed():
  try:
    return importlib.metadata.distribution("bfpo-jax")
  except importlib.metadata.PackageNotFoundError:
    return None


def _command():
  """The console script if installed (checked to be this checkout's), else
  ``python -m bfpo_jax``."""
  if _installed() is None:
    return [sys.executable, "-m", "bfpo_jax"]
  script = os.path.join(os.path.dirname(sys.executable), "bfpo-jax")
  assert os.path.isfile(script), f"bfpo-jax is installed but {script} is not"
  return [script]


def _run(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([*args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


def test_the_console_script_is_declared_and_resolves():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts == {"bfpo-jax": "bfpo_jax.cli:entry_point"}
  module, name = scripts["bfpo-jax"].split(":")
  assert getattr(__import__(module, fromlist=[name]), name) is cli.entry_point
  dist = _installed()
  if dist is not None:  # the installed metadata says the same
    (entry,) = [e for e in dist.entry_points if e.name == "bfpo-jax"]
    assert entry.value == scripts["bfpo-jax"]


def test_help_lists_every_subcommand_in_one_line():
  proc = _run(*_command(), "--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "usage: bfpo-jax COMMAND [ARGS...]"
  names = [*cli.COMMANDS, *cli.EXPERIMENTS]
  assert names == ["train", "evaluate", "data", "convert", "merge",
                   "synthetic", "safehelp_mini", "safehelp_real"]
  tables = {**cli.COMMANDS, **cli.EXPERIMENTS}
  for name in names:
    (line,) = [x for x in lines if x.split()[:1] == [name]]
    assert line.endswith(f"[{tables[name][0]}]"), line
  assert any(x.split()[:2] == ["experiment", "NAME"] for x in lines)


def test_train_dry_run_is_the_modules(tmp_path):
  flags = ["--config", "configs/tiny.py", "--dry_run",
           f"--workdir={tmp_path / 'run'}"]
  ours = _run(*_command(), "train", *flags)
  assert ours.returncode == 0, ours.stderr[-3000:]
  module = _run(sys.executable, "-m", "bfpo_jax.train", *flags)
  assert module.returncode == 0, module.stderr[-3000:]
  assert ours.stdout == module.stdout
  assert "steps: 24 (8 per epoch)" in ours.stdout
  assert os.listdir(tmp_path) == []


def test_data_help_and_a_bad_flag_are_the_modules():
  for args in (["--help"], ["--source"]):  # argparse: exit 0, then exit 2
    ours = _run(*_command(), "data", *args)
    module = _run(sys.executable, "-m", "bfpo_jax.data", *args)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        module.returncode, module.stdout, module.stderr)
  assert ours.returncode == 2 and "--source" in module.stderr


def test_the_arguments_pass_through_unchanged(tmp_path):
  report = tmp_path / "r.json"
  argv = ["data", "--source", f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl",
          "--tokenizer", "mistral", "--max_prompt_length", "32",
          "--max_length", "64", "--report",
          str(report)]
  with pytest.raises(SystemExit) as e:  # the module's own sys.exit(main())
    cli.main(argv)
  assert e.value.code == 0
  entry = json.loads(report.read_text())[f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl"]
  assert entry["rows_used"] == 48
  assert entry["token_lengths"]["chosen"]["max"] <= 64  # --max_length got there


@pytest.mark.parametrize("table,name,argv", [
    ("COMMANDS", "convert", ["convert", "in.gguf", "out"]),
    ("EXPERIMENTS", "safehelp_real", ["experiment", "safehelp_real", "--quick"]),
])
@pytest.mark.parametrize("module", ["bfpo_jax.no_such_module",
                                    "bfpo_jax.no_such_package.module"])
def test_a_module_this_installation_lacks_is_one_line(monkeypatch, capsys,
                                                      table, name, argv,
                                                      module):
  entries = getattr(cli, table)
  monkeypatch.setitem(entries, name, (module, entries[name][1]))
  assert cli.main(argv) == 2
  out, err = capsys.readouterr()
  shown = " ".join(argv[:2] if table == "EXPERIMENTS" else argv[:1])
  assert out == "" and err == (f"error: bfpo-jax {shown}: {module} is not in "
                               "this installation of bfpo_jax\n")


@pytest.mark.parametrize("argv,message", [
    ([], None),
    (["trian"], "error: bfpo-jax: unknown command 'trian'; commands: train, "
     "evaluate, data, convert, merge, experiment (see bfpo-jax --help)"),
    (["experiment"], "error: bfpo-jax experiment: unknown experiment; NAME is "
     "one of synthetic, safehelp_mini, safehelp_real"),
    (["experiment", "mini"], "error: bfpo-jax experiment: unknown experiment "
     "'mini'; NAME is one of synthetic, safehelp_mini, safehelp_real"),
])
def test_a_bad_command_line_is_exit_2(capsys, argv, message):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  if message is None:  # no command: the usage, on stderr
    assert err.startswith("usage: bfpo-jax COMMAND")
  else:
    assert err == message + "\n"
