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

Several processes (one per host, or several on one machine) run the same command and join
through `jax.distributed` (README "Scaling", launch/):

    python main.py --multi_host ...                     # Cloud TPU VM / pod: found by itself
    srun python main.py ...                             # SLURM: detected from SLURM_* variables
    python main.py --coordinator_address=host0:1234 --num_processes=2 --process_id=0 ...
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumed.")
_MULTI_HOST = flags.DEFINE_bool(
  "multi_host",
  False,
  "Call jax.distributed.initialize() and let it find the cluster (Cloud TPU VMs and pods, "
  "SLURM, Open MPI, Kubernetes).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0's coordinator (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 … N-1.")
_LOCAL_DEVICES = flags.DEFINE_list(
  "local_device_ids", None, "Devices this process uses (e.g. one GPU per process: 0)."
)


def quiet_library_logs() -> None:
  """Keeps library INFO chatter (orbax per save, grain, jax's backend probing) out of the log."""
  import logging as std_logging

  def keep(record) -> bool:
    noisy = any(lib in record.pathname for lib in ("/orbax/", "/grain/", "xla_bridge.py"))
    return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(keep)


def init_distributed() -> None:
  """Joins the other processes (when launched that way) and logs where this process stands;
  processes other than 0 log warnings and errors only from then on."""
  import jax

  from d2v_jax import sharding

  launch = sharding.distributed_init_args(
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    local_device_ids=_LOCAL_DEVICES.value,
    multi_host=_MULTI_HOST.value,
    environ=os.environ,
  )
  if launch is not None:
    how, kwargs = launch
    logging.info("jax.distributed.initialize(%s): %s", kwargs or "", how)
    jax.distributed.initialize(**kwargs)
  logging.info(
    "Process %d of %d; %d local devices %s; %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    [d.id for d in jax.local_devices()],
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def default_run_name(config) -> str:
  """runs/<modality>_<variant> for pretraining, runs/<modality>_<task>_<variant> for fine-tuning."""
  task = f"_{config.head.task}" if config.mode == "finetune" else ""
  return f"{config.modality}{task}_{config.model.variant}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one message (the hint first, the flag named) for a misspelt
  config field, a missing or failing config file or a bad flag value, instead of a traceback."""
  from d2v_jax import errors

  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/audio.py")
    _CONFIG.value.keys()  # a config file that failed to load raises its OSError here
  except flags.Error as error:
    errors.exit_with(f"{errors.flag_error_message(error, argv)} (see python main.py --help)")
  except app.UsageError as error:
    errors.exit_with(str(error))
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    if flags.FLAGS["verbosity"].value >= 1:
      raise
    errors.exit_with(errors.flag_error_message(error, argv))
  return rest


def main(argv):
  del argv
  quiet_library_logs()
  import jax  # after flag parsing, so XLA_FLAGS set by launchers apply

  from d2v_jax import errors

  init_distributed()
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", default_run_name(config))
  logging.info("Work directory: %s", os.path.abspath(workdir))

  try:
    run_mode(config, workdir)
  except Exception as error:
    if jax.process_count() == 1:
      errors.report(error)  # a mistake the user can mend: one message, exit 1
      raise
    # jax's shutdown waits at a barrier for every process, so a process that failed alone
    # would hang there (minutes, until the coordination timeout) with its error unprinted.
    message = errors.user_message(error)
    if message:
      logging.error("Process %d: %s", jax.process_index(), message)
    else:
      logging.exception(
        "Process %d failed; exiting without the shutdown barrier", jax.process_index()
      )
    logging.flush()
    os._exit(1)


def run_mode(config, workdir: str) -> None:
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
  app.run(main, flags_parser=parse_flags)
