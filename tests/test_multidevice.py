"""Sharded steps on 8 fake CPU devices equal the 1-device run, padded pairs
or packed (the same pairs)."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def test_meshes_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_steps.py")],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  base = results["single/acc1"]["losses"]
  for name, r in results.items():
    np.testing.assert_allclose(r["losses"], base, rtol=2e-5, err_msg=name)
    assert r["max_param_diff"] < 1e-5, (name, r["max_param_diff"])
  mixed = results["data2_fsdp2_tensor2/acc1"]
  assert mixed["devices"] == 8
  assert mixed["down_proj"] == ["tensor", "fsdp"]
  assert mixed["gate_proj"] == ["fsdp", "tensor"]
  assert results["fsdp8/acc1"]["down_proj"][-1] == "fsdp"
  assert {"packed/data2_fsdp2_tensor2/acc1", "packed/fsdp8/acc2"} <= set(results)
