"""Suite-wide JAX guard (nanodo's practice): rank promotion raises.

A silent ``[B] + [B, 1]`` broadcast is a bug, not a convenience. The training
loops the tests run also refuse implicit host/device transfers
(``helpers.no_implicit_transfers``, big_vision's ``jax_transfer_guard``).

Also the one fixture two modules share: SafeHelp-mini's ``--quick`` run,
minutes of CPU, made once per test run.
"""

import os
import re
import types

import jax
import pytest

from tests.helpers import once_per_test_run, run_notebook

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def safehelp_mini_notebook(tmp_path_factory):
  """``notebooks/safehelp_mini.ipynb`` run top to bottom as a user runs it.

  Its cell calls ``safehelp_mini.main(["--out", OUT, "--quick"])``, the
  CLI's own entry point, so this one run is also the CLI's ``--quick`` run.

  Returns:
    ``stdout``, the notebook's, and ``out``, the folder the run wrote.
  """
  def make(folder):
    # The notebook's OUT is under tempfile.mkdtemp(): TMPDIR puts it here.
    return run_notebook("safehelp_mini.ipynb", folder, TMPDIR=str(folder))

  folder, stdout = once_per_test_run(tmp_path_factory, "safehelp_mini", make)
  wrote = re.search(r"^wrote (.+)/results\.json, results\.md and results\.png",
                    stdout, re.M)
  assert wrote, stdout[-3000:]
  assert os.path.commonpath([wrote[1], str(folder)]) == str(folder), wrote[1]
  return types.SimpleNamespace(stdout=stdout, out=wrote[1])
