"""d2v-jax entry point: flags -> (multi-host init) -> pretrain, probe, extract or fine-tune.

    python main.py --config=configs/audio.py --workdir=runs/audio_tiny
    python main.py --config=configs/image.py --workdir=runs/image_tiny
    python main.py --config=configs/text.py --workdir=runs/text_tiny
    python main.py --config=configs/audio.py --workdir=runs/audio_tiny --config.mode=probe
    python main.py --config=configs/audio.py --workdir=runs/audio_tiny --config.mode=extract \
        --config.extract.input=data/speech/clips --config.extract.output=/tmp/features
    python main.py --config=configs/audio_ctc.py --workdir=runs/audio_ctc \
        --config.init.pretrained=runs/audio_tiny

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


def default_run_name(config) -> str:
  """runs/<modality>_<variant> for pretraining, runs/<modality>_<task>_<variant> for fine-tuning."""
  task = f"_{config.head.task}" if config.mode == "finetune" else ""
  return f"{config.modality}{task}_{config.model.variant}"


def main(argv):
  del argv
  quiet_library_logs()
  import jax  # after flag parsing, so XLA_FLAGS set by launchers apply

  if _MULTI_HOST.value:
    jax.distributed.initialize()
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", default_run_name(config))
  logging.info("Work directory: %s", os.path.abspath(workdir))

  from d2v_jax import extract, finetune, train

  if config.mode == "pretrain":
    train.train_and_evaluate(config, workdir)
  elif config.mode == "probe":
    train.probe_checkpoint(config, workdir)
  elif config.mode == "extract":
    e = config.extract
    if not e.input or not e.output:
      raise app.UsageError("mode=extract needs --config.extract.input and --config.extract.output")
    extract.run_extraction(workdir, e.input, e.output, e.layers, e.format, batch_size=e.batch_size)
  elif config.mode == "finetune":
    finetune.finetune_and_evaluate(config, workdir)
  else:
    raise app.UsageError(
      f"config.mode={config.mode!r}: use pretrain, probe or extract (pretraining configs) or "
      "finetune (configs/*_ctc.py, *_cls.py)"
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
