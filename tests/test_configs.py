"""Every shipped config (each named variant) validates for the device count it
was written for, without loading data or building a model (MaxText's
configs_test); and every enumerated field refuses a bad value by name."""

import glob
import importlib
import os

import pytest

from bfpo_jax.config import ENUMERATED, STAGES, ConfigError, default_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# file -> (its get_config arguments, the devices its mesh and batch are for)
SHIPPED = {
    "tiny": ([(s,) for s in STAGES], 1),
    "a100x4": ([("bfpo",), ("dpo",), ("ipo",)], 4),
    "a100x4_sft": ([()], 4),
    "redteam": ([("bfpo",)], 2),
    "smollm2": ([()], 1),
    "sacpo": ([(v,) for v in ("helpful", "safety", "safety_first",
                              "helpful_second")], 4),  # ",tiny": test_sacpo
    "tpu_v4_32": ([("bfpo",)], 16),
    "tpu_v5e_64": ([("bfpo",)], 64),
}
CASES = [(name, args, devices) for name, (variants, devices) in SHIPPED.items()
         for args in variants]


def test_every_config_file_is_listed():
  files = {os.path.basename(p)[:-3]
           for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert files - {"__init__"} == set(SHIPPED)


@pytest.mark.parametrize("name,args,devices", CASES,
                         ids=[f"{n}:{','.join(a)}" for n, a, _ in CASES])
def test_shipped_config_validates(name, args, devices, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config(*args)
  if config.model.hf_path.startswith("models/"):  # the folder its docstring
    config.model.hf_path = str(tmp_path)  # has bfpo_jax.model.convert write
  validate(config, devices)


@pytest.mark.parametrize("field", sorted(ENUMERATED))
def test_a_bad_enumerated_value_is_named_before_anything_loads(field):
  config = default_config()
  config.data.sources = ("pku_saferlhf:/nonexistent/file.jsonl",)
  *parents, leaf = field.split(".")
  section = config
  for part in parents:
    section = section[part]
  section[leaf] = "bogus"
  with pytest.raises(ConfigError, match=rf"^{field}: 'bogus' is not one of"):
    validate(config, 1)


def test_a_fixed_mesh_config_refuses_other_device_counts():
  with pytest.raises(ConfigError, match=r"^(mesh|batch): "):
    validate(importlib.import_module("configs.a100x4").get_config(), 2)
