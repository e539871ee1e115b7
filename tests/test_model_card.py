"""Model cards: Hub metadata and the run's recipe, read back by huggingface_hub."""

from huggingface_hub import ModelCard

from bfpo_jax import model_card
from configs import a100x4, tiny

SUMMARY = {"status": "finished", "step": 900, "steps": 900,
           "eval": {"loss": 0.25, "rewards/accuracy": 0.75,
                    "rewards/accuracy/safe_unsafe": 0.5}}
REPORT = {"pku_saferlhf:PKU-Alignment/PKU-SafeRLHF": {
    "role": "train", "pairs": 28800, "eval": 0,
    "rows_skipped": {"identical_responses": 12, "empty_response": 3}}}


def _card(tmp_path, config, **kwargs):
  path = model_card.write(str(tmp_path), config, **kwargs)
  return ModelCard.load(path)


def test_a_hub_run_card_has_the_hub_metadata_and_the_recipe(tmp_path):
  config = a100x4.get_config()
  config.model.hf_path = "mistralai/Mistral-7B-v0.1@main"
  card = _card(tmp_path, config, source=config.model.hf_path, source_folder="",
               summary=SUMMARY, report=REPORT)
  data = card.data
  assert data.base_model == "mistralai/Mistral-7B-v0.1"
  assert data.datasets == ["PKU-Alignment/PKU-SafeRLHF",
                           "HuggingFaceH4/ultrafeedback_binarized"]
  assert data.license == "unknown" and data.library_name == "transformers"
  assert {"bfpo", "safety", "jax"} <= set(data.tags)
  text = card.text
  for expected in (
      "| stage | bfpo |",
      "| loss | bfpo, beta 0.01, alpha 0.5, b1 3; log-probs summed over "
      "response tokens |",
      r"| trainable | selective: `layers/\d+/mlp/down_proj/kernel$` |",
      "| steps | 900 of 900 |",
      "| batch | 32 per step = 2 per device x 4 microbatches |",
      "| `pku_saferlhf:PKU-Alignment/PKU-SafeRLHF` | train | 28800 | 0 | 15 |",
      "| rewards/accuracy/safe_unsafe | 0.5 |"):
    assert expected in text, expected


def test_license_and_base_model_carry_over_from_the_source_card(tmp_path):
  source = tmp_path / "sft_export"
  source.mkdir()
  (source / "README.md").write_text(
      "---\nbase_model: mistralai/Mistral-7B-v0.1\nlicense: apache-2.0\n---\n"
      "# an earlier stage\n")
  config = tiny.get_config("dpo")
  config.trainable.mode = "lora"
  card = _card(tmp_path / "out", config, source=str(source),
               source_folder=str(source), summary=None, report=None,
               library="peft")
  assert card.data.base_model == "mistralai/Mistral-7B-v0.1"
  assert card.data.license == "apache-2.0" and card.data.library_name == "peft"
  assert card.data.datasets is None  # local files only
  assert "lora" in card.data.tags and "dpo" in card.data.tags
  assert "| loss | dpo, beta 0.1, label_smoothing 0; log-probs summed" in card.text
  assert "None recorded." in card.text
  config.export_license = "cc-by-nc-4.0"  # the user's choice wins
  card = _card(tmp_path / "out", config, source=str(source),
               source_folder=str(source), summary=None, report=None)
  assert card.data.license == "cc-by-nc-4.0"
