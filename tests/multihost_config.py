"""The tiny image pretraining run of tests/test_multihost.py, as a config file for main.py:

    python main.py --config=tests/multihost_config.py --workdir=/tmp/run --config.loop.fsdp=2

2 blocks of width 32 on 16² digits in 4×4 patches, global batch 8, 3 updates with checkpoints
after updates 2 and 3; with `loop.fsdp` > 1 every array of >= 2 dimensions is split (no size
threshold). The learning rate is still warming up (0, then 3e-5, 7e-5), so Adam's first
sign-like steps cannot turn float-rounding differences of near-zero gradients into visible
parameter differences; the Adam moments compared by the test hold the gradients themselves.
The size fields are not command-line fields of configs/image.py, hence this file.
"""

import ml_collections

from configs import image


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = image.get_config("variant=tiny")
  config.model.update(num_layers=2, dim=32, num_heads=4, mlp_dim=64)  # override the variant's
  config.update_from_flattened_dict(
    {
      "model.image_size": 16,
      "targets.top_k": 2,
      "input.batch_size": 8,
      "loop.total_steps": 3,
      "loop.checkpoint_every": 2,
      "loop.keep_checkpoints": 5,
      "loop.log_every": 1,
      "loop.progress_bar": False,
      "loop.fsdp_min_mb": 0.0,
      # Off unless asked (`--config.probe.enabled=true`): then the linear probe (one seed) and
      # the kNN probe after update 2 (metrics.jsonl) and of the initial and the final encoder
      # (probe.json); each costs seconds of compilation and fitting.
      "probe.enabled": False,
      "probe.every": 2,
      "probe.seeds": (0,),
    }
  )
  return config
