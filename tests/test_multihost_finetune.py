"""Multi-process fine-tuning on CPU (issue 9): real processes joined by `jax.distributed`.

Two `main.py` processes with 2 CPU devices each join on loopback and fine-tune a tiny image
classifier (tests/multihost_finetune_config.py: configs/image_cls.py's recipe, 3 updates of a
global batch of 8, the dev set scored after update 2 and at the end) with FSDP (mesh data=2 x
fsdp=2), from the encoder of a pretraining checkpoint that ONE process wrote on one device;
meanwhile this process fine-tunes the same config data-parallel on its 4 devices. Fine-tuning
has its own multi-process paths, which pretraining (tests/test_multihost.py) does not cover:
the pretrained encoder is read by every process and spread over the mesh, each process loads
its rows of the labelled batches, and every process scores the whole dev set from a gathered
copy of the parameters while process 0 alone writes metrics and eval.json. So both runs must
end with the same parameters and Adam state, the same per-step metrics and dev scores, and the
two-process run's final checkpoint must restore here (another process count and layout). The
time goes into compiling the fine-tuning step three times in parallel.
"""

import json

import jax
import numpy as np
import pytest

from d2v_jax import checkpoint, finetune, sharding, train
from tests import helpers, multihost_config, multihost_finetune_config
from tests.multihost import assert_states_close, launch, metric_rows, wait_beside

CONFIG = "tests/multihost_finetune_config.py"
NUM_CLASSES = 10  # the digits'
# Throughput of each run's own timing: the only metrics that may differ.
RATES = ("steps_per_sec", "images_per_sec", "data_wait_frac")


def finetune_config(pretrained):
  config = multihost_finetune_config.get_config()
  config.init.pretrained = str(pretrained)
  return config


def restore(workdir, pretrained, step: int):
  """The fine-tuning TrainState of `workdir`'s checkpoint `step`, as host numpy arrays."""
  config = finetune_config(pretrained)
  run = finetune.load_pretrained_into_config(config)  # the model sizes of the pretraining run
  config.head.num_outputs = NUM_CLASSES  # what the run took from its data
  _, _, _, make_state, _ = finetune.setup(config, run)
  target = sharding.replicated(sharding.make_mesh())
  state = checkpoint.Checkpointer(workdir, config).restore(
    step, checkpoint.abstract_state(make_state, sharding=target)
  )
  return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(two-process FSDP workdir, one-process workdir, pretraining workdir, the processes' logs)."""
  root = tmp_path_factory.mktemp("multihost_finetune")
  pretrained = root / "pretrain"
  # A pretraining checkpoint of tests/multihost_config.py's model written by one process on one
  # device (its initial weights: what matters is that every process loads the same encoder).
  # Restored untargeted, such a checkpoint was refused by orbax in a 2-process run ("Topology
  # mismatch"); `pretrained.load_pretrained` now reads it into host numpy.
  pretrain_config = multihost_config.get_config()
  _, _, _, make_state = train.setup(pretrain_config)
  params = helpers.fast_jit(make_state)().params
  helpers.save_pretraining_checkpoint(pretrained, pretrain_config, params)

  multi, single = root / "two_processes", root / "one_process"
  procs = launch(CONFIG, multi, 2, 2, root, **{"loop.fsdp": 2, "init.pretrained": pretrained})
  # Meanwhile: 1 process, 4 devices.
  logs = wait_beside(
    procs, lambda: finetune.finetune_and_evaluate(finetune_config(pretrained), single)
  )
  return multi, single, pretrained, logs


def test_two_fsdp_processes_finetune_like_one_process(runs):
  multi, single, _, logs = runs
  first, second = logs
  assert "Process 0 of 2; 2 local devices" in first and "Process 1 of 2" in second
  assert "Mesh: data=2 x fsdp=2 over 4 cpu devices of 2 process(es); global batch 8" in first
  assert "FSDP: " in first and "Encoder initialised from " in first
  # Process 0 alone logs, and alone writes metrics (the file is appended to: 3 rows, not 6).
  assert "] step 3 | " in first and "Evaluation on test" in first
  assert "] step " not in second and "Evaluation on" not in second
  rows, expected = metric_rows(multi), metric_rows(single)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert "dev_accuracy" in rows[1] and "dev_accuracy" not in rows[2]  # eval.every = 2
  for row, want in zip(rows, expected, strict=True):
    assert row.keys() == want.keys()
    for key in row.keys() - set(RATES):
      np.testing.assert_allclose(
        row[key], want[key], rtol=1e-5, err_msg=f"step {row['step']} {key}"
      )
  # Both processes saved their data position.
  data = multi / "checkpoints" / "3" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data.iterdir()}


def test_dev_scores_are_the_one_process_ones(runs):
  """Accuracies over the same 355 digits: equal, not close; step 2's and the final ones."""
  multi, single, pretrained, _ = runs
  for key in ("dev_accuracy", "dev_top5_accuracy"):
    assert metric_rows(multi)[1][key] == metric_rows(single)[1][key]
  scores = json.loads((multi / "eval.json").read_text())
  assert scores == json.loads((single / "eval.json").read_text())
  assert scores["step"] == 3 and scores["examples"] == 355
  assert scores["init"]["checkpoint"] == str(pretrained.resolve() / "checkpoints" / "1")
  assert 0.0 < scores["accuracy"] < scores["top5_accuracy"] < 1.0


def test_final_checkpoint_restores_like_the_one_process_state(runs):
  """2 processes x 2 devices with fsdp=2 -> this process, replicated on 4 devices."""
  multi, single, pretrained, _ = runs
  state = restore(multi, pretrained, 3)
  assert_states_close(state, restore(single, pretrained, 3))
  assert state.teacher is None and "head" in state.params  # a fine-tuning state
