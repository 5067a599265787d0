"""d2v-jax entry point: flags -> (multi-host init) -> pretraining or probing.

    python main.py --config=configs/audio.py --workdir=runs/audio_tiny
    python main.py --config=configs/image.py --workdir=runs/image_tiny
    python main.py --config=configs/text.py --workdir=runs/text_tiny
    python main.py --config=configs/audio.py --workdir=runs/audio_tiny --config.mode=probe

`--config.<group>.<field>=value` overrides any config value; unknown fields are an error.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumed.")
_MULTI_HOST = flags.DEFINE_bool(
  "multi_host", False, "Call jax.distributed.initialize() (TPU pods, SLURM GPU jobs)."
)


def quiet_library_logs() -> None:
  """Keeps library INFO chatter (orbax per save, grain, jax's backend probing) out of the log."""
  import logging as std_logging

  def keep(record) -> bool:
    noisy = any(lib in record.pathname for lib in ("/orbax/", "/grain/", "xla_bridge.py"))
    return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(keep)


def main(argv):
  del argv
  quiet_library_logs()
  import jax  # after flag parsing, so XLA_FLAGS set by launchers apply

  if _MULTI_HOST.value:
    jax.distributed.initialize()
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", f"{config.modality}_{config.model.variant}")
  logging.info("Work directory: %s", os.path.abspath(workdir))

  from d2v_jax import train

  if config.mode == "pretrain":
    train.train_and_evaluate(config, workdir)
  elif config.mode == "probe":
    train.probe_checkpoint(config, workdir)
  else:
    raise app.UsageError(f"config.mode={config.mode!r}: use 'pretrain' or 'probe'")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
