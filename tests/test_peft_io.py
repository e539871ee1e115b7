"""LoRA adapters to and from PEFT folders, checked against peft itself."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from bfpo_jax import peft_io, trainable
from bfpo_jax import train_step as ts
from bfpo_jax.model import apply, load_hf, save_hf
from bfpo_jax.model.mistral import param_path

PATTERN = r"(self_attn/[qv]_proj|mlp/down_proj|lm_head)/kernel$"
IDS = torch.tensor([[1, 17, 4, 99, 23, 5, 64, 2, 31]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  folder = tmp_path_factory.mktemp("base")
  torch.manual_seed(0)
  transformers.MistralForCausalLM(transformers.MistralConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=False, sliding_window=None)).save_pretrained(folder)
  return str(folder)


def _flat(tree):
  return {param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _torch_logits(model):
  with torch.no_grad():
    return model.eval()(IDS).logits.numpy()


def _random_adapters(params, pattern, rank, seed):
  mask = trainable.trainable_mask(params, "lora", pattern)
  lora = trainable.init_lora(params, mask, rank, jax.random.key(seed))
  # B starts at zero; give it values so the adapters change the model.
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape),
                      lora)


def test_saved_adapters_load_in_peft_as_the_merged_export(base, tmp_path):
  cfg, params = load_hf(base)
  lora = _random_adapters(params, PATTERN, rank=4, seed=0)
  peft_io.save_peft(str(tmp_path / "adapter"), lora, rank=4, alpha=8.0,
                    base_model=base)
  save_hf(str(tmp_path / "merged"), cfg, trainable.lora_merge(params, lora, 2.0))

  model = peft.PeftModel.from_pretrained(
      transformers.MistralForCausalLM.from_pretrained(base),
      str(tmp_path / "adapter"))
  merged = transformers.MistralForCausalLM.from_pretrained(
      str(tmp_path / "merged"))
  theirs = _torch_logits(model)
  np.testing.assert_allclose(theirs, _torch_logits(merged), atol=1e-4)
  assert np.abs(theirs - _torch_logits(
      transformers.MistralForCausalLM.from_pretrained(base))).max() > 1e-2

  # Module names and scaling as peft writes them for the same adapters.
  ours = load_file(str(tmp_path / "adapter" / peft_io.ADAPTER_WEIGHTS))
  assert set(ours) == set(peft.get_peft_model_state_dict(
      model, save_embedding_layers=False))  # the base lm_head is the base's
  config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
  assert (config.r, config.lora_alpha) == (4, 8.0)
  assert set(config.target_modules) == {"q_proj", "v_proj", "down_proj",
                                        "lm_head"}
  layer = model.base_model.model.model.layers[1].self_attn.q_proj
  assert layer.scaling["default"] == 2.0


def test_target_modules_name_single_layers_in_full():
  kernels = [f"layers/{i}/self_attn/{m}_proj/kernel" for i in range(3)
             for m in "qv"]
  assert peft_io.target_modules(kernels, kernels) == ["q_proj", "v_proj"]
  every_q_and_one_v = [k for k in kernels if "q_proj" in k] + [kernels[1]]
  assert peft_io.target_modules(every_q_and_one_v, kernels) == [
      "q_proj", "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("rslora", [False, True])
def test_a_folder_peft_wrote_loads_as_our_adapters(base, tmp_path, rslora):
  model = peft.get_peft_model(
      transformers.MistralForCausalLM.from_pretrained(base),
      peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                      use_rslora=rslora, init_lora_weights=False))
  model.save_pretrained(str(tmp_path / "adapter"))
  theirs = _torch_logits(model)

  cfg, params = load_hf(base)
  lora, settings = peft_io.load_peft(str(tmp_path / "adapter"), params,
                                     cfg.num_hidden_layers)
  assert settings["rank"] == 4
  assert settings["alpha"] / 4 == pytest.approx(16 / (2 if rslora else 4))
  assert settings["pattern"] == (r"^(layers/\d+/self_attn/o_proj/kernel|"
                                 r"layers/\d+/self_attn/q_proj/kernel)$")
  merged = trainable.lora_merge(params, lora,
                                settings["alpha"] / settings["rank"])
  np.testing.assert_allclose(apply(cfg, merged, jnp.asarray(IDS.numpy())),
                             theirs, atol=1e-4)
  # The adapters sit exactly where a LoRA run with that pattern puts them.
  mask = trainable.trainable_mask(params, "lora", settings["pattern"])
  assert jax.tree.structure(lora) == jax.tree.structure(
      trainable.init_lora(params, mask, 4, jax.random.key(0)))


def test_adapters_a_run_starts_from_are_its_reference(base):
  cfg, params = load_hf(base)
  lora = _random_adapters(params, PATTERN, rank=4, seed=2)
  step_cfg = ts.StepConfig(mode="lora", lora_scale=2.0)
  state, _ = ts.create_state(params, optax.sgd(0.1), step_cfg, cfg,
                             pattern=PATTERN, lora_rank=4, lora=lora)
  policy = _flat(ts.policy_params(state, step_cfg))
  reference = _flat(ts.reference_params(state, step_cfg))
  assert policy.keys() == reference.keys()
  for path, x in policy.items():
    np.testing.assert_array_equal(x, reference[path])
  q = "layers/0/self_attn/q_proj/kernel"
  assert not np.allclose(policy[q], _flat(params)[q])
  fresh, _ = ts.create_state(params, optax.sgd(0.1), step_cfg, cfg,
                             pattern=PATTERN, lora_rank=4)
  assert fresh.reference is None  # fresh adapters: the base is the reference


def test_what_peft_lora_cannot_express_is_refused_in_one_line(base, tmp_path):
  cfg, params = load_hf(base)
  folder = tmp_path / "dora"
  peft.get_peft_model(transformers.MistralForCausalLM.from_pretrained(base),
                      peft.LoraConfig(r=2, target_modules=["q_proj"],
                                      use_dora=True)).save_pretrained(folder)
  with pytest.raises(peft_io.AdapterError, match="use_dora=True is not "
                     "supported"):
    peft_io.load_peft(str(folder), params, cfg.num_hidden_layers)

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / peft_io.ADAPTER_CONFIG).write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
  (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
  with pytest.raises(peft_io.AdapterError, match="adapter_model.bin is refused"):
    peft_io.load_peft(str(pickled), params, cfg.num_hidden_layers)

  embedding = _random_adapters(params, r"embed_tokens/embedding$", 2, 0)
  with pytest.raises(peft_io.AdapterError, match="embed_tokens/embedding"):
    peft_io.save_peft(str(tmp_path / "emb"), embedding, rank=2, alpha=4.0)
  assert not os.path.exists(tmp_path / "emb")


def test_a_peft_folder_merges_into_the_base_for_a_selective_run(base, tmp_path):
  from bfpo_jax import build, sharding
  from configs import tiny

  model = peft.get_peft_model(
      transformers.MistralForCausalLM.from_pretrained(base),
      peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"],
                      init_lora_weights=False))
  model.save_pretrained(str(tmp_path / "adapter"))
  config = tiny.get_config()
  config.trainable.mode = "selective"
  config.init_from = str(tmp_path / "adapter")  # its base: the folder it names
  build.check_model_source(config)
  assert build.model_source(config) == base
  cfg, params = build.load_model(config, sharding.make_mesh(1, -1, 1))
  np.testing.assert_allclose(apply(cfg, params, jnp.asarray(IDS.numpy())),
                             _torch_logits(model), atol=1e-4)
  assert build.initial_lora(config, cfg) is None
