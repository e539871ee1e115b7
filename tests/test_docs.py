"""Docs that cannot rot: every ``python -m bfpo_jax...`` and ``bfpo-jax ...``
command line in README.md and docs/*.md runs, dry-runs, validates or at
least parses (tests/docs_commands.py says which and how), so a renamed flag
or config field fails here."""

import json
import os
import subprocess
import sys

import jax
import pytest

from bfpo_jax.model import MistralConfig, init_params, save_hf
from bfpo_jax.tokenizer import load_tokenizer
from tests import docs_commands
from tests.helpers import ROOT

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
          "m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def test_the_docs_name_their_commands():
  commands = docs_commands.collect()
  files = {f for f, _ in commands}
  assert "README.md" in files and len(commands) >= 30
  assert any("--dry_run" in c for _, c in commands)


@pytest.mark.slow
def test_every_documented_command_runs_or_parses(tmp_path):
  tiny = tmp_path / "tiny"  # the stand-in for weights not on this machine
  cfg = MistralConfig.tiny()
  save_hf(str(tiny), cfg, init_params(cfg, jax.random.key(0)))
  tokenizer = load_tokenizer()
  tokenizer.chat_template = CHATML  # for data.template=tokenizer configs
  tokenizer.save_pretrained(str(tiny))
  result = subprocess.run(
      [sys.executable, "tests/docs_commands.py", str(tiny), str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()
          if line.startswith("{")]
  failed = [f"{r['file']}: {r['command']} -> {r['error']}" for r in rows
            if r["how"] == "failed"]
  assert not failed, "\n".join(failed)
  hows = {r["how"] for r in rows}
  assert {"ran", "dry_run", "validated", "parsed"} <= hows
  assert len(rows) == len(docs_commands.collect())
