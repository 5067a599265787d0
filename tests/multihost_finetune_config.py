"""The tiny image fine-tuning run of tests/test_multihost_finetune.py, as a config file for main.py:

    python main.py --config=tests/multihost_finetune_config.py --workdir=/tmp/cls \
        --config.init.pretrained=/tmp/pretrain --config.loop.fsdp=2

configs/image_cls.py's tiny recipe (classification of the embedded digits, label smoothing,
drop path 0.1, layer-wise LR decay) with the model of tests/multihost_config.py (2 blocks of
width 32 on 16² digits in 4×4 patches; a pretraining run named by `init.pretrained` sets the
same sizes), global batch 8, 3 updates with checkpoints after updates 2 and 3, and the dev set
(the 355 test digits) scored after update 2 and at the end. With a 2-update warm-up (LR 0,
1e-3, 2e-3) the last update moves weights by about 2e-3, far beyond the ~1e-8 float-rounding
differences between one process and two, so a state one update off cannot pass for the right
one. The size fields are not command-line fields of configs/image_cls.py, hence this file.
"""

import ml_collections

from configs import image_cls


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = image_cls.get_config("variant=tiny")
  config.model.update(num_layers=2, dim=32, num_heads=4, mlp_dim=64)  # override the variant's
  config.update_from_flattened_dict(
    {
      "model.image_size": 16,
      "input.image_size": 16,
      "input.batch_size": 8,
      "input.eval_batch_size": 64,
      "optim.warmup_steps": 2,
      "loop.total_steps": 3,
      "loop.checkpoint_every": 2,
      "loop.keep_checkpoints": 5,
      "loop.log_every": 1,
      "loop.progress_bar": False,
      "loop.fsdp_min_mb": 0.0,
      "eval.every": 2,
    }
  )
  return config
