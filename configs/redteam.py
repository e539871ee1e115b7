"""redteaming.sh: BFPO on the reference's red-team data, from Zephyr-7b-beta.

    huggingface-cli download HuggingFaceH4/zephyr-7b-beta \\
        --local-dir models/zephyr-7b-beta
    # data/zephyr-7b-beta_beaver_redteaming.json: from the reference
    # repository (github.com/wx-zhang/bfpo), rows prompt, modeloutput1,
    # modeloutput2, better_modelout (1 or 2), is_modelout{1,2}_safe
    launch/gpu.sh --config configs/redteam.py --workdir runs/bfpo_redteam

As redteaming.sh runs it: 2 GPUs x 2 pairs x 4 accumulation = 16 pairs per
step, no buffer stream, everything else as configs/a100x4.py (lr 5e-7,
cosine, one epoch, beta 0.01, selective down_proj). The reference evaluates
on the training file itself (its "test" split maps to "train"), so does this.
"""

from configs import a100x4

REDTEAM = "data/zephyr-7b-beta_beaver_redteaming.json"


def get_config(stage="bfpo"):
  c = a100x4.get_config(stage)
  c.init_from = ""
  c.model.hf_path = "models/zephyr-7b-beta"
  c.data.sources = (f"redteam:{REDTEAM}",)
  c.data.buffer_sources = ()
  c.data.buffer_task = "sft"
  c.data.buffer_weight = 0.0
  c.data.eval_sources = (f"redteam:{REDTEAM}",)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 1
  c.batch.global_size = 16
  c.batch.per_device = 2
  c.batch.accumulation = 4
  c.keep_checkpoints = 10  # save_total_limit=10
  return c
