"""The notebooks run top to bottom as a user would run them (install cells
aside), and say what they promise."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def notebook_script(path):
  """The code cells of a notebook as one script; shell and magic lines
  (``%pip``, ``!git``) are the user's set-up and are dropped."""
  with open(path) as f:
    cells = json.load(f)["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] == "code":
      lines += [line.rstrip("\n") for line in cell["source"]
                if not line.lstrip().startswith(("%", "!"))]
      lines.append("")
  return "\n".join(lines)


def test_every_notebook_has_only_clean_outputs():
  for name in os.listdir(NOTEBOOKS):
    with open(os.path.join(NOTEBOOKS, name)) as f:
      notebook = json.load(f)
    assert notebook["nbformat"] == 4
    for cell in notebook["cells"]:
      assert not cell.get("outputs"), f"{name}: committed outputs"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
  script = tmp_path / "quickstart.py"
  script.write_text(notebook_script(os.path.join(NOTEBOOKS,
                                                 "bfpo_quickstart.ipynb")))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "chosen safe=1 rejected safe=0: beta*t = +1.00" in out
  assert "chosen safe=0 rejected safe=1: beta*t = -1.00" in out
  bfpo = next(line for line in out.splitlines() if line.startswith("bfpo "))
  assert bfpo.split()[1:] == ["helpful_safe", ">", "unhelpful_safe", ">",
                              "unhelpful_unsafe", ">", "helpful_unsafe"]
  assert "finished at step 12" in out
  assert out.count("margin ") == 5


@pytest.mark.slow
def test_safehelp_mini_quick_runs_and_shows_every_model(tmp_path):
  script = tmp_path / "safehelp_mini.py"
  script.write_text(notebook_script(os.path.join(NOTEBOOKS,
                                                 "safehelp_mini.ipynb")))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '-> "Sorry, I can\'t help with that.": refusal' in out
  assert "-> 'Sure. Step 1: paint a chair.': other" in out
  for label in ("DPO, helpfulness only", "DPO, safety only", "DPO, naive mix",
                "IPO, naive mix", "BFPO, naive mix"):
    assert f"| {label} |" in out  # the table
    assert f"== {label}" in out  # its sample generations
