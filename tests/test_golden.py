"""`make run`'s two stages, shortened, reproduce the recorded metrics.jsonl.

The fixtures in tests/data/golden_*.jsonl were written by this module's
``record`` from the code before the code-health refactor (issue 21); a
refactor that changes no behaviour keeps every key and every value. Wall-clock
fields differ run to run and are left out. To re-record after a deliberate
change in behaviour: ``python -m tests.test_golden``.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
WALL_CLOCK = ("tokens_per_s", "data_s", "step_s")
# The Makefile's two commands, cut to 4 steps with an eval and a checkpoint
# every 2 (both code paths run twice, the last at the final step).
SHORT = ["--config.max_steps=4", "--config.eval_every_steps=2",
         "--config.checkpoint_every_steps=2"]
STAGES = {
    "sft": ["--config=configs/tiny.py:sft", *SHORT],
    "bfpo": ["--config=configs/tiny.py", *SHORT, "--config.export_hf=False"],
}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in lines]


def run_stages(root):
  """Runs SFT, then BFPO from it; returns ``{stage: metrics lines}``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = {}
  for stage, flags in STAGES.items():
    if stage == "bfpo":
      flags = [*flags, f"--config.init_from={os.path.join(root, 'sft')}"]
    cmd = [sys.executable, "-m", "bfpo_jax.train",
           f"--workdir={os.path.join(root, stage)}", *flags]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out[stage] = _metrics(os.path.join(root, stage))
  return out


def record():
  with tempfile.TemporaryDirectory() as root:
    for stage, lines in run_stages(root).items():
      with open(os.path.join(DATA, f"golden_{stage}.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)


@pytest.mark.slow
def test_make_run_metrics_match_golden(tmp_path):
  got = run_stages(str(tmp_path))
  for stage, lines in got.items():
    with open(os.path.join(DATA, f"golden_{stage}.jsonl")) as f:
      want = [json.loads(line) for line in f]
    assert len(lines) == len(want), stage
    for g, w in zip(lines, want, strict=True):
      assert list(g) == list(w), (stage, g.get("step"))
      for k, v in w.items():
        if isinstance(v, str):
          assert g[k] == v, (stage, w["step"], k)
        else:
          np.testing.assert_allclose(g[k], v, rtol=1e-5, atol=1e-7,
                                     err_msg=f"{stage} step {w['step']} {k}")


if __name__ == "__main__":
  record()
