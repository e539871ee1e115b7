"""The notebooks run top to bottom as a user would run them, open on Colab
from GitHub, and say what they promise."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import NOTEBOOKS, ROOT, run_notebook

NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/"
                   r"assets/colab-badge\.svg\)\]\(https://colab\.research\.google"
                   r"\.com/github/(?P<repo>[\w.-]+/[\w.-]+)/blob/main/"
                   r"(?P<path>notebooks/[\w.-]+\.ipynb)\)")


def test_every_notebook_has_only_clean_outputs():
  for name in os.listdir(NOTEBOOKS):
    with open(os.path.join(NOTEBOOKS, name)) as f:
      notebook = json.load(f)
    assert notebook["nbformat"] == 4
    for cell in notebook["cells"]:
      assert not cell.get("outputs"), f"{name}: committed outputs"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
  out = run_notebook("bfpo_quickstart.ipynb", tmp_path)
  assert "chosen safe=1 rejected safe=0: beta*t = +1.00" in out
  assert "chosen safe=0 rejected safe=1: beta*t = -1.00" in out
  bfpo = next(line for line in out.splitlines() if line.startswith("bfpo "))
  assert bfpo.split()[1:] == ["helpful_safe", ">", "unhelpful_safe", ">",
                              "unhelpful_unsafe", ">", "helpful_unsafe"]
  assert "finished at step 12" in out
  assert out.count("margin ") == 5


def _code_cells(name):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    return ["".join(c["source"]) for c in json.load(f)["cells"]
            if c["cell_type"] == "code"]


def test_each_notebook_has_an_open_in_colab_badge_to_its_own_repository():
  with open(os.path.join(ROOT, "README.md")) as f:
    badges = {m["path"]: m["repo"] for m in BADGE.finditer(f.read())}
  assert set(badges) == {f"notebooks/{name}" for name in NAMES}
  for name in NAMES:
    with open(os.path.join(NOTEBOOKS, name)) as f:
      first = "".join(json.load(f)["cells"][0]["source"])
    match = BADGE.search(first)
    assert match and match["path"] == f"notebooks/{name}", name
    # The badge opens the repository the set-up cell clones.
    assert f'"https://github.com/{match["repo"]}"' in _code_cells(name)[0]
    assert badges[match["path"]] == match["repo"]


# Runs a notebook's set-up cell with git and pip replaced by a recorder; a
# "clone" copies this checkout. Prints the calls, the cwd and the package used.
SETUP = r"""
import json, os, shutil, subprocess, sys
root, cell = sys.argv[1], open(sys.argv[2]).read()
calls = []
def run(cmd, check=False):
  calls.append(cmd)
  if cmd[:2] == ["git", "clone"]:
    shutil.copytree(root, cmd[-1], ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info"))
  return subprocess.CompletedProcess(cmd, 0)
subprocess.run = run
exec(cell, {"__name__": "__main__"})
import bfpo_jax
from configs import tiny
print(json.dumps({"calls": calls, "cwd": os.getcwd(),
                  "package": os.path.dirname(bfpo_jax.__file__)}))
"""


def _setup(name, cwd, tmp_path):
  cell = tmp_path / f"{name}.setup.py"
  cell.write_text(_code_cells(name)[0])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", SETUP, ROOT, str(cell)],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_the_setup_cell_clones_on_a_fresh_runtime_and_not_in_a_checkout(
    name, tmp_path):
  here = _setup(name, ROOT, tmp_path)
  assert here == {"calls": [], "cwd": ROOT,
                  "package": os.path.join(ROOT, "bfpo_jax")}
  in_notebooks = _setup(name, NOTEBOOKS, tmp_path)  # Jupyter's default cwd
  assert in_notebooks == here
  fresh = tmp_path / "colab"
  fresh.mkdir()
  colab = _setup(name, str(fresh), tmp_path)
  clone = str(fresh / "bfpo-jax")
  assert colab["cwd"] == clone and colab["package"] == os.path.join(
      clone, "bfpo_jax")
  git, pip = colab["calls"]
  assert git[:3] == ["git", "clone", "--depth=1"] and git[-1] == "bfpo-jax"
  assert git[3].startswith("https://github.com/")
  assert pip[:5] == [sys.executable, "-m", "pip", "install", "-q"]
  assert pip[5:7] == ["-r", "requirements.txt"]
  if name == "tpu_quickstart.ipynb":
    assert pip[7:] == ["jax[tpu]>=0.7"]


@pytest.mark.slow
def test_tpu_quickstart_runs_on_eight_fake_devices(tmp_path):
  out = run_notebook("tpu_quickstart.ipynb", tmp_path,
                     XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert out.startswith("8 devices, cpu (cpu), 1 process(es)"), out[:500]
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert "global batch 8 = 1 per device x 1 microbatches" in out
  assert "finished at step 12/12" in out
  assert re.search(r"throughput: [\d,]+ tokens/s, [\d.,]+ pairs/s, [\d,]+ "
                   r"ms/step on 8 devices \(median of steps 3-12\)", out), out


# SafeHelp-mini's and SafeHelp-real's notebooks run once per test run
# (conftest.py); what they show is checked by the one test of each that reads
# their --quick run (test_safehelp_mini.py, test_safehelp_real.py), so no
# second xdist worker waits minutes for the same run.
