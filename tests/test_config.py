"""Config defaults that follow the method, and optional extras asked for."""

import json
import sys

import pytest

from bfpo_jax import build
from bfpo_jax.config import (
  ConfigError,
  default_config,
  describe_loss,
  loss_setting,
  validate,
)
from configs import tiny


@pytest.mark.parametrize("stage,beta,average", [
    ("bfpo", 0.01, False),  # the paper's tau, summed log-probs
    ("dpo", 0.1, False),  # TRL's DPOConfig default
    ("ipo", 0.1, True),  # the IPO paper and TRL average over response tokens
])
def test_unset_loss_fields_take_the_stages_defaults(stage, beta, average):
  config = default_config()
  config.stage = stage
  assert config.loss.beta is None and config.loss.average_logps is None
  assert loss_setting(config, "beta") == beta
  assert loss_setting(config, "average_logps") is average
  step = build.step_config(config)
  assert (step.beta, step.average_logps) == (beta, average)
  config.loss.beta, config.loss.average_logps = 0.5, not average  # set: kept
  step = build.step_config(config)
  assert (step.beta, step.average_logps) == (0.5, not average)


def test_the_summary_line_names_the_effective_loss():
  assert describe_loss(tiny.get_config("ipo")) == (
      "ipo, beta 0.1; log-probs averaged over response tokens")
  assert describe_loss(tiny.get_config("dpo")) == (
      "dpo, beta 0.1, label_smoothing 0; log-probs summed over response tokens")
  assert describe_loss(tiny.get_config("bfpo")) == (
      "bfpo, beta 0.1, alpha 0.5, b1 3; log-probs summed over response tokens")


def test_wandb_without_the_package_is_one_line(monkeypatch):
  config = tiny.get_config()
  config.logging.wandb = True
  validate(config, 1)  # installed here
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not
  with pytest.raises(ConfigError, match=r"^logging.wandb: the wandb package is "
                     r"not installed; pip install 'bfpo-jax\[wandb\]'"):
    validate(config, 1)


def test_an_older_runs_config_json_gains_the_new_fields(tmp_path):
  from bfpo_jax.train import _saved_config

  old = tiny.get_config().to_dict()
  del old["logging"], old["export_license"]
  old["loss"]["beta"] = 0.1
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = _saved_config(str(tmp_path))
  assert config.logging.wandb is False and config.export_license == ""
  assert config.loss.beta == 0.1 and config.stage == "bfpo"
  validate(config, 1)
