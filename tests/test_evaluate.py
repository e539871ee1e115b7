"""The bfpo_jax harness backend against the harness's own hf backend.

A tiny random float32 Mistral (real 32k Mistral tokenizer) saved as an HF
folder; the same requests go to ``lm_eval``'s ``HFLM`` (PyTorch) and to
``BfpoJaxLM``.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import bfpo_jax.evaluate  # noqa: F401  (registers bfpo_jax)
from bfpo_jax import train_step as ts
from bfpo_jax.build import EXPORT_DIR
from bfpo_jax.checkpoint import Checkpointer
from bfpo_jax.config import default_config
from bfpo_jax.evaluate import BfpoJaxLM, batching
from bfpo_jax.evaluate.__main__ import main
from bfpo_jax.model.hf_io import load_hf, save_hf
from bfpo_jax.model.tokenizer import load_tokenizer
from bfpo_jax.train import resume_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "eval_tasks")
MAX_LENGTH = 48
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                 "{% endif %}")


def _tiny_folder(path, model_cls=transformers.MistralForCausalLM, seed=0,
                 **overrides):
  fields = dict(vocab_size=32000, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  fields.update(overrides)
  config_cls = (transformers.LlamaConfig
                if model_cls is transformers.LlamaForCausalLM
                else transformers.MistralConfig)
  torch.manual_seed(seed)
  model_cls(config_cls(**fields)).save_pretrained(path)
  load_tokenizer().save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _tiny_folder(tmp_path_factory.mktemp("mistral"), sliding_window=None)


@pytest.fixture(scope="module")
def hf(folder):
  return HFLM(pretrained=folder, dtype="float32", batch_size=4,
              max_length=MAX_LENGTH, device="cpu")


@pytest.fixture(scope="module")
def ours(folder):
  return get_model("bfpo_jax").create_from_arg_string(
      f"pretrained={folder},dtype=float32,batch_size=4,"
      f"max_length={MAX_LENGTH}")


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _greedy_requests(hf, contexts):
  """(context, continuation) pairs whose one-token continuation is the
  model's argmax, found with the PyTorch model."""
  found = []
  for context in contexts:
    with torch.no_grad():
      logits = hf.model(torch.tensor([hf.tok_encode(context)])).logits[0, -1]
    token = int(logits.argmax())
    piece = hf.tokenizer.convert_ids_to_tokens(token)
    if not (piece.startswith("▁") and piece[1:].isalpha()):
      continue
    continuation = " " + piece[1:]
    if hf._encode_pair(context, continuation)[1] == [token]:
      found.append((context, continuation))
  return found


LOGLIKELIHOOD = [
    ("The capital of France is", " Paris"),
    ("", "Hello world"),  # empty context: the prefix token stands in
    ("Question: what is 2+2? Answer:", " 4"),
    ("Hello ", "there"),  # the context's trailing space moves over
    ("word " * 60, " tail words"),  # longer than the window: cut on the left
    ("x", " y" * 40),  # a long continuation pushes the context out
]


@pytest.mark.parametrize("packing", [True, False])
def test_loglikelihood_equals_hf_backend(folder, hf, ours, packing):
  assert ours.packing  # the default
  lm = ours if packing else BfpoJaxLM(
      pretrained=folder, dtype="float32", batch_size=2,
      max_length=MAX_LENGTH, packing=False)
  greedy = _greedy_requests(hf, [f"Story number {i} begins" for i in range(12)]
                            + ["The", "I think that", "Once upon a"])
  assert greedy, "no context with a greedy one-token word continuation"
  requests = _requests("loglikelihood", LOGLIKELIHOOD + greedy)
  theirs, mine = hf.loglikelihood(requests), lm.loglikelihood(requests)
  np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs],
                             atol=1e-4, rtol=0)
  assert [m[1] for m in mine] == [t[1] for t in theirs]
  assert all(m[1] for m in mine[len(LOGLIKELIHOOD):])  # is_greedy both ways


def test_loglikelihood_rolling_equals_hf_backend(hf, ours):
  texts = ["The quick brown fox jumps over the lazy dog. " * 8,  # 3 windows
           "short", ""]
  requests = _requests("loglikelihood_rolling", [(t,) for t in texts])
  np.testing.assert_allclose(ours.loglikelihood_rolling(requests),
                             hf.loglikelihood_rolling(requests), atol=1e-4,
                             rtol=0)


def test_greedy_generate_until_equals_hf_backend(hf, ours):
  contexts = ["Once upon a time", "The", "a b c d " * 15]  # the last is cut
  free = {"until": [], "max_gen_toks": 16, "do_sample": False}
  requests = _requests("generate_until", [(c, free) for c in contexts])
  mine = ours.generate_until(requests)
  assert mine == hf.generate_until(requests)
  assert all(len(m) > 5 for m in mine)
  # Stop strings taken from inside the free generations.
  stopped = {"until": [mine[0][3:6], mine[2][4:7]], "max_gen_toks": 16,
             "do_sample": False}
  requests = _requests("generate_until", [(c, stopped) for c in contexts])
  mine_stopped = ours.generate_until(requests)
  assert mine_stopped == hf.generate_until(requests)
  assert len(mine_stopped[0]) <= 3 and mine[0].startswith(mine_stopped[0])


def test_sampling_follows_the_seed(ours):
  sampled = {"until": [], "max_gen_toks": 12, "do_sample": True,
             "temperature": 1.0, "top_p": 0.95}
  requests = _requests("generate_until", [("Once upon a time", sampled)] * 3)
  first = ours.generate_until(requests)
  assert ours.generate_until(requests) == first
  greedy = ours.generate_until(_requests(
      "generate_until", [("Once upon a time", {"until": [], "max_gen_toks": 12})]))
  seed = ours.seed
  try:
    ours.seed = seed + 1
    assert ours.generate_until(requests) != first
  finally:
    ours.seed = seed
  assert first[0] != greedy[0]


def test_unsupported_generation_argument_is_one_line(ours):
  with pytest.raises(ValueError, match="'top_k'.*not supported"):
    ours.generate_until(_requests("generate_until", [
        ("Hi", {"until": [], "max_gen_toks": 4, "top_k": 5})]))


def test_made_from_the_harness_registry_with_hf_argument_names(folder):
  assert get_model("bfpo_jax") is BfpoJaxLM
  assert get_model("hf") is HFLM  # registering ours keeps the harness's own
  lm = get_model("bfpo_jax").create_from_arg_string(
      f"pretrained={folder},dtype=float32,batch_size=8,max_length=2048")
  assert (lm.max_length, lm.batch_size) == (2048, 8)
  assert lm.get_model_info()["model_dtype"] == "float32"


def test_chat_template_equals_hf_backend(tmp_path, folder):
  chat = str(tmp_path / "chat")
  shutil.copytree(folder, chat)
  tok = load_tokenizer(chat)
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(chat)
  hf_lm = HFLM(pretrained=chat, dtype="float32", device="cpu")
  lm = BfpoJaxLM(pretrained=chat, dtype="float32")
  history = [{"role": "system", "content": ""},
             {"role": "user", "content": "How do I bake bread?"}]
  assert lm.apply_chat_template(history) == hf_lm.apply_chat_template(history)
  assert lm.apply_chat_template(history).endswith("<|assistant|>\n")
  assert lm.chat_template(True) == CHAT_TEMPLATE
  assert lm.tokenizer_name == hf_lm.tokenizer_name


def test_llama_folder_equals_hf_backend(tmp_path):
  path = _tiny_folder(tmp_path / "llama", transformers.LlamaForCausalLM,
                      seed=1, num_key_value_heads=4, attention_bias=True)
  hf_lm = HFLM(pretrained=path, dtype="float32", max_length=MAX_LENGTH,
               device="cpu")
  lm = BfpoJaxLM(pretrained=path, dtype="float32", max_length=MAX_LENGTH)
  requests = _requests("loglikelihood", LOGLIKELIHOOD[:4])
  np.testing.assert_allclose([m[0] for m in lm.loglikelihood(requests)],
                             [t[0] for t in hf_lm.loglikelihood(requests)],
                             atol=1e-4, rtol=0)


def test_workdir_reads_its_newest_state(tmp_path, folder):
  """A LoRA run's checkpoint is rebuilt on its base; a newer export wins."""
  config = default_config()
  config.init_from, config.trainable.mode = folder, "lora"
  cfg, params = load_hf(folder)
  step_cfg = ts.StepConfig(mode="lora", lora_scale=config.trainable.lora_alpha
                           / config.trainable.lora_rank)
  state, _ = ts.create_state(params, optax.sgd(0.1), step_cfg, cfg,
                             lora_rank=config.trainable.lora_rank)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  state = state._replace(trainable=jax.tree.map(  # a trained-looking B
      lambda x: 0.05 * jax.random.normal(next(keys), x.shape), state.trainable))
  workdir = str(tmp_path / "run")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
  ckpt.save(state, {"fingerprint": resume_fingerprint(config),
                    "data_iterator": {}, "counters": {}}, force=True)
  ckpt.close()
  merged = str(tmp_path / "merged")
  save_hf(merged, cfg, ts.policy_params(state, step_cfg))
  load_tokenizer(folder).save_pretrained(merged)

  requests = _requests("loglikelihood", LOGLIKELIHOOD[:3])
  from_ckpt = BfpoJaxLM(pretrained=workdir, dtype="float32",
                        max_length=MAX_LENGTH)
  assert "checkpoint 0" in from_ckpt.source
  expected = BfpoJaxLM(pretrained=merged, dtype="float32",
                       max_length=MAX_LENGTH).loglikelihood(requests)
  got = from_ckpt.loglikelihood(requests)
  np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected],
                             atol=1e-5, rtol=0)
  base = [b[0] for b in BfpoJaxLM(pretrained=folder, dtype="float32",
                                  max_length=MAX_LENGTH).loglikelihood(requests)]
  assert np.abs(np.array([g[0] for g in got]) - base).max() > 1e-3

  save_hf(os.path.join(workdir, EXPORT_DIR), cfg, params)  # a later export
  load_tokenizer(folder).save_pretrained(os.path.join(workdir, EXPORT_DIR))
  from_export = BfpoJaxLM(pretrained=workdir, dtype="float32",
                          max_length=MAX_LENGTH)
  assert EXPORT_DIR in from_export.source
  np.testing.assert_allclose(
      [e[0] for e in from_export.loglikelihood(requests)], base, atol=1e-5,
      rtol=0)


def _run_cli(*args, devices=None):
  cmd = [sys.executable, "-m", "bfpo_jax.evaluate", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


def _samples(out, task):
  with open(os.path.join(out, f"samples_{task}.jsonl")) as f:
    return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def _scores(samples):
  """Per request: the log-likelihood (and greedy flag), or the generation."""
  flat = []
  for sample in samples:
    for resp in sample["resps"]:
      flat.append(resp[0])
  return flat


def _assert_same(mine, theirs, atol):
  for a, b in zip(mine, theirs, strict=True):
    if isinstance(a, str):
      assert a == b
    else:
      a, b = np.atleast_1d(a), np.atleast_1d(b)
      np.testing.assert_allclose(a.astype(float), b.astype(float), atol=atol,
                                 rtol=0)


TINY_TASKS = ["bfpo_tiny_mc", "bfpo_tiny_gen", "bfpo_tiny_ppl"]


@pytest.mark.slow
def test_tasks_end_to_end_equal_hf_and_eight_devices(tmp_path, folder, hf):
  """Multiple choice, generation and perplexity tasks through simple_evaluate:
  the CLI on 1 device equals the hf backend, and 8 devices (with bucketed
  rows instead of packed ones) equal 1."""
  common = ["--model", folder, "--tasks", ",".join(TINY_TASKS),
            "--include_path", TASKS, "--bootstrap_iters", "0"]
  one = str(tmp_path / "one")
  assert main(common + ["--out", one, "--batch_size", "4",
                        "--model_args", f"max_length={MAX_LENGTH}"]) == 0
  with open(os.path.join(one, "results.json")) as f:
    results = json.load(f)["results"]
  assert set(results) == set(TINY_TASKS)
  assert 0 <= results["bfpo_tiny_mc"]["acc,none"] <= 1
  assert results["bfpo_tiny_ppl"]["word_perplexity,none"] > 1

  theirs = simple_evaluate(model=hf, tasks=TINY_TASKS, bootstrap_iters=0,
                           task_manager=TaskManager(include_path=TASKS,
                                                    include_defaults=False))
  for task in TINY_TASKS:
    hf_samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    _assert_same(_scores(_samples(one, task)), _scores(hf_samples), 1e-4)

  eight = str(tmp_path / "eight")
  proc = _run_cli(*common, "--out", eight, "--batch_size", "1", "--model_args",
                  f"max_length={MAX_LENGTH},data=2,fsdp=4,packing=False",
                  devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in proc.stderr
  assert "compiled shapes" in proc.stderr
  for task in TINY_TASKS:
    _assert_same(_scores(_samples(eight, task)), _scores(_samples(one, task)),
                 1e-5)


@pytest.mark.parametrize("case", ["unknown_task", "pickle_only", "bad_arg",
                                  "no_chat_template"])
def test_cli_refuses_bad_input_in_one_line(tmp_path, folder, case, capsys):
  model, tasks, extra = folder, "bfpo_tiny_mc", []
  if case == "unknown_task":
    tasks = "bfpo_tiny_mc,no_such_task"
  elif case == "pickle_only":
    model = str(tmp_path / "pickle")
    os.makedirs(model)
    shutil.copy(os.path.join(folder, "config.json"), model)
    with open(os.path.join(model, "pytorch_model.bin"), "wb") as f:
      f.write(b"never unpickled")
  elif case == "bad_arg":
    extra = ["--model_args", "no_such_arg=1"]
  else:
    extra = ["--apply_chat_template"]
  out = str(tmp_path / "out")
  code = main(["--model", model, "--tasks", tasks, "--include_path", TASKS,
               "--out", out, *extra])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert not os.path.exists(out)
  expected = {"unknown_task": "unknown task 'no_such_task'",
              "pickle_only": "AutoModelForCausalLM.from_pretrained",
              "bad_arg": "no_such_arg",
              "no_chat_template": "no chat_template"}[case]
  assert expected in err[0]


def test_scoring_rows_follow_the_harness_truncation():
  row = batching.scoring_row([1, 2, 3], [4, 5], max_length=8)
  assert row == batching.Row((1, 2, 3, 4), (2, 3, 4, 5), 2)
  row = batching.scoring_row(list(range(10, 20)), [4, 5], max_length=4)
  assert row == batching.Row((17, 18, 19, 4), (18, 19, 4, 5), 2)
  with pytest.raises(ValueError, match="exceeds max_length"):
    batching.scoring_row([1], [2] * 5, max_length=4)


def test_batches_place_every_row_once_in_few_shapes():
  rng = np.random.default_rng(0)
  rows = [batching.scoring_row([1] * int(n), [7, 8], 256)
          for n in rng.integers(1, 250, 40)]
  for make, max_shapes in ((batching.bucketed_batches, 5),
                           (batching.packed_batches, 1)):
    batches = list(make(rows, 4, 256))
    assert len({b.input_ids.shape for b in batches}) <= max_shapes
    placed = sorted(p[0] for b in batches for p in b.placements)
    assert placed == list(range(len(rows)))
    for b in batches:
      for _, line, start, end in b.placements:
        np.testing.assert_array_equal(b.labels[line, start:end], [7, 8])
        positions = b.score_positions[line, start:end]
        np.testing.assert_array_equal(b.input_ids[line, positions], [1, 7])
        assert b.score_mask[line, start:end].all()
        assert (b.segment_ids[line, positions] > 0).all()
      assert b.score_mask.sum() == 2 * len(b.placements)
      most = max(np.bincount([p[1] for p in b.placements]))
      assert b.score_positions.shape[1] == batching.bucket_length(
          2 * most, b.input_ids.shape[1])
  packed = list(batching.packed_batches(rows, 4, 256))
  bucketed = list(batching.bucketed_batches(rows, 4, 256))
  assert batching.padding_share(packed) < batching.padding_share(bucketed)
