"""The paper's recipe: the shipped configs against bfpo.sh / redteaming.sh,
the data a run builds from them, and the chat template on export."""

import importlib
import json
import os

import jax
import optax
import pytest
import transformers

from bfpo_jax import build
from bfpo_jax import train_step as ts
from bfpo_jax.config import ConfigError, default_config, validate
from bfpo_jax.data.tokenize import CHAT_TEMPLATE
from bfpo_jax.model import MistralConfig, init_params
from bfpo_jax.model.tokenizer import load_tokenizer

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "bfpo_jax", "data", "tiny")
PKU_AT_REVISION = ("pku_saferlhf:PKU-Alignment/PKU-SafeRLHF?revision="
                   "ff7ba91063016c78a225b0f74e1c0860bb18230f")


def _config(name, *args):
  return importlib.import_module(f"configs.{name}").get_config(*args)


def _runnable(config, tmp_path):
  """The config with its model folders pointed at an existing folder."""
  for field in ("init_from",):
    if config[field]:
      config[field] = str(tmp_path)
  if config.model.hf_path:
    config.model.hf_path = str(tmp_path)
  return config


def test_bfpo_config_is_bfpo_sh_second_command(tmp_path):
  c = _config("a100x4")
  # From the SFT stage's workdir, 4 GPUs x 2 pairs x 4 accumulation.
  assert c.init_from == "runs/sft_7b" and c.stage == "bfpo"
  assert (c.batch.per_device, c.batch.accumulation, c.mesh.fsdp,
          c.batch.global_size) == (2, 4, 4, 32)
  # balance_bfpo.yaml: PKU-SafeRLHF 0.2 (pinned) + the UltraFeedback buffer.
  assert c.data.sources == (f"{PKU_AT_REVISION}&take=0.2",)
  assert c.data.buffer_sources == (
      "ultrafeedback:HuggingFaceH4/ultrafeedback_binarized",)
  assert (c.data.buffer_task, c.data.buffer_weight) == ("preference", 1.0)
  assert c.data.eval_sources == (f"{PKU_AT_REVISION}&split=test",)
  assert c.data.eval_fraction == 0.0 and c.eval_every_steps == 100
  # selective.yaml.
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.schedule,
          c.optimizer.warmup_ratio, c.optimizer.weight_decay,
          c.optimizer.clip_norm) == ("adamw", 5e-7, "cosine", 0.1, 0.0, 1.0)
  assert (c.loss.beta, c.loss.alpha, c.loss.b1) == (0.01, 0.5, 3.0)
  assert (c.data.max_length, c.data.max_prompt_length) == (1024, 512)
  assert (c.data.template, c.data.truncation) == ("reference", "trl")
  assert c.trainable.mode == "selective" and c.num_epochs == 1
  validate(_runnable(c, tmp_path), 4)


def test_sft_config_is_bfpo_sh_first_command(tmp_path):
  c = _config("a100x4_sft")
  assert c.stage == "sft" and c.model.hf_path == "models/Mistral-7B-v0.1"
  assert not c.init_from and c.trainable.mode == "selective"
  assert (c.batch.per_device, c.batch.accumulation, c.mesh.fsdp,
          c.batch.global_size) == (4, 2, 4, 32)
  assert c.optimizer.learning_rate == 5e-7 and c.num_epochs == 1
  assert c.data.sources == ("ultrachat:HuggingFaceH4/ultrachat_200k",
                            f"{PKU_AT_REVISION}&take=0.2")
  assert (c.data.max_length, c.data.pack_sft, c.data.pack_mode,
          c.data.sft_loss) == (2048, True, "stream", "all")
  assert not c.data.buffer_sources
  validate(_runnable(c, tmp_path), 4)


def test_redteam_config_is_redteaming_sh(tmp_path):
  c = _config("redteam")
  assert c.model.hf_path == "models/zephyr-7b-beta" and not c.init_from
  assert (c.batch.per_device, c.batch.accumulation, c.mesh.fsdp,
          c.batch.global_size) == (2, 4, 2, 16)
  assert c.data.sources == (
      "redteam:data/zephyr-7b-beta_beaver_redteaming.json",)
  assert c.data.eval_sources == c.data.sources  # its test split is train
  assert not c.data.buffer_sources and c.keep_checkpoints == 10
  validate(_runnable(c, tmp_path), 2)


@pytest.mark.parametrize("field,value,message", [
    ("template", "chatml", "data.template"),
    ("buffer_task", "rlhf", "data.buffer_task"),
    ("eval_sources", ("pku_saferlhf:x?size=3",), "data.eval_sources"),
    ("buffer_sources", ("nonsense:x",), "data.buffer_sources"),
])
def test_bad_data_fields_are_named(field, value, message):
  c = _config("tiny")
  c.data[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(c, 1)


def test_a_preference_buffer_needs_a_preference_stage():
  c = _config("tiny", "sft")
  c.data.buffer_task = "preference"
  with pytest.raises(ConfigError, match="data.buffer_task"):
    validate(c, 1)


def _tiny_bfpo():
  c = default_config()
  c.tokenizer = "mistral"
  c.data.sources = (f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl?take=0.5",)
  c.data.buffer_sources = (
      f"ultrafeedback:{TINY}/ultrafeedback_binarized.jsonl",)
  c.data.buffer_task, c.data.buffer_weight = "preference", 1.0
  c.data.eval_sources = (f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl?take=10",)
  c.data.eval_fraction = 0.0
  c.data.max_prompt_length, c.data.max_length = 64, 128
  c.data.buckets = (128,)
  c.batch.global_size, c.batch.per_device, c.batch.accumulation = 8, 4, 2
  return c


def test_safety_batches_set_the_steps_and_helpfulness_rides_along():
  c = _tiny_bfpo()
  tok = load_tokenizer()
  examples = build.load_examples(c, tok)
  safety = f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl?take=0.5"
  report = examples.report
  assert (report[safety]["rows_total"], report[safety]["pairs"]) == (48, 24)
  assert report[f"eval:pku_saferlhf:{TINY}/pku_saferlhf.jsonl?take=10"][
      "pairs"] == 10 == len(examples.held_out)
  # One helpfulness pair per safety pair: 3 steps x 8 of the 48 available.
  buffer_name = f"buffer:ultrafeedback:{TINY}/ultrafeedback_binarized.jsonl"
  assert report[buffer_name]["role"] == "buffer"
  assert report[buffer_name]["pairs"] == 24
  assert build.steps_per_epoch(c, examples) == 3
  data = build.make_data(c, examples, 1)
  batch = data.train[0]
  assert batch["chosen_input_ids"].shape[0] == 8
  assert batch["buffer"]["chosen_input_ids"].shape[0] == 8
  assert batch["buffer"]["chosen_is_safe"].all()
  # 10 eval pairs in batches of 4: the last has two zero-weight pad rows.
  assert [b["weight"].tolist() for b in data.eval_batches] == [
      [1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]


def test_sft_rows_are_packed_as_the_reference_packs_them():
  c = _config("tiny", "sft")
  c.data.max_length, c.data.buckets = 128, (128,)
  tok = load_tokenizer()
  whole = build.load_examples(c, tok)
  c.data.pack_sft, c.data.pack_mode = True, "stream"
  packed = build.load_examples(c, tok)
  (rows,) = packed.train
  docs = [e for source in whole.train for e in source]
  assert len(rows) == sum(len(d["input_ids"]) for d in docs) // 128
  assert all(len(r["input_ids"]) == 128 and all(r["loss_mask"]) for r in rows)
  # Every training document is in the stream (one BOS each), except the few
  # that start in the dropped tail of < 128 tokens.
  stream = [t for r in rows for t in r["input_ids"]]
  lost = 127 // min(len(d["input_ids"]) for d in docs) + 1
  assert len(docs) - lost <= stream.count(1) <= len(docs)
  held_out = sum(len(d["input_ids"]) for d in whole.held_out) // 128
  assert len(packed.held_out) == held_out


def test_export_carries_the_zephyr_chat_template(tmp_path):
  from bfpo_jax import train

  config = default_config()
  model_cfg = MistralConfig.tiny()
  step_cfg = ts.StepConfig(stage="bfpo", mode="selective")
  params = init_params(model_cfg, jax.random.key(0))
  state, _ = ts.create_state(params, optax.sgd(0.0), step_cfg, model_cfg)
  out = train.export(config, model_cfg, state, step_cfg, load_tokenizer(),
                     str(tmp_path))
  exported = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}]
  text = exported.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=True)
  assert text == ("<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\n"
                  "Bye</s>\n<|assistant|>\n")
  assert exported.chat_template == CHAT_TEMPLATE
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["vocab_size"] == 32000
  # The lm-evaluation-harness's chat mode renders with it too.
  from lm_eval.models.huggingface import HFLM

  lm = HFLM(pretrained=out, device="cpu", batch_size=1)
  assert lm.apply_chat_template(
      [{"role": "system", "content": "Be safe."},
       {"role": "user", "content": "Hi"}]) == (
           "<|system|>\nBe safe.</s>\n<|user|>\nHi</s>\n<|assistant|>\n")
