"""Multi-process training on CPU (issue 9): real processes joined by `jax.distributed`.

Two `main.py` processes with 2 CPU devices each join on loopback (`--coordinator_address`,
gloo collectives) and pretrain a tiny image model (tests/multihost_config.py) for 3 steps with
FSDP (mesh data=2 x fsdp=2); meanwhile this process trains the same config data-parallel on its
4 devices. Both must end with the same student, teacher and Adam state, and the same losses.
Both runs also probe the encoder (linear and kNN) after update 2 and, at the end, the initial
and the trained encoder: every process gathers the FSDP-split parameters and probes them,
process 0 alone reports, so the two-process scores must be the one-process ones.
The two-process run's step-2 checkpoint is then resumed by ONE process on ONE device with
fsdp=1 (another process count, device count and layout), which must reach this process's
step-3 state; the two-process run also loads here as pretrained weights (fine-tuning's
start). The time goes into compiling the train step four times, three of them in parallel.
Fine-tuning with several processes: tests/test_multihost_finetune.py.
"""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from d2v_jax import checkpoint, pretrained, sharding, train
from d2v_jax.data import image as image_data
from tests import multihost_config
from tests.multihost import assert_states_close, launch, metric_rows, wait, wait_beside

CONFIG = "tests/multihost_config.py"
# The fixture's runs probe the encoder (tests/multihost_config.py); the resumed run does not.
PROBE = {"probe.enabled": True}


def tiny_config(**overrides):
  config = multihost_config.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def restore(workdir, step: int):
  """The TrainState of `workdir`'s checkpoint `step`, gathered into host numpy arrays."""
  config = tiny_config()
  _, _, _, make_state = train.setup(config)
  target = sharding.replicated(sharding.make_mesh())
  state = checkpoint.Checkpointer(workdir, config).restore(
    step, checkpoint.abstract_state(make_state, sharding=target)
  )
  return jax.device_get(state)


def losses(workdir) -> list[float]:
  return [row["loss"] for row in metric_rows(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(two-process FSDP workdir, one-process data-parallel workdir, the two processes' logs)."""
  root = tmp_path_factory.mktemp("multihost")
  multi, single = root / "two_processes", root / "one_process"
  procs = launch(CONFIG, multi, 2, 2, root, **{"loop.fsdp": 2, **PROBE})
  # Meanwhile: 1 process, 4 devices.
  logs = wait_beside(procs, lambda: train.train_and_evaluate(tiny_config(**PROBE), single))
  return multi, single, logs, root


def test_two_fsdp_processes_train_like_one_data_parallel_process(runs):
  multi, single, logs, _ = runs
  first, second = logs
  assert "Process 0 of 2; 2 local devices" in first and "4 global devices" in first
  assert "Process 1 of 2; 2 local devices" in second
  assert "Mesh: data=2 x fsdp=2 over 4 cpu devices of 2 process(es)" in first
  assert "global batch 8, 4 rows per process" in first
  assert "FSDP: " in first  # the state really was split
  assert "] step 3 | " in first and "] step 3 | " not in second  # process 0 logs alone
  data = multi / "checkpoints" / "3" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data.iterdir()}

  assert_states_close(restore(multi, 3), restore(single, 3))
  np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
  assert len(losses(multi)) == 3


def test_two_processes_probe_like_one_process(runs):
  """The probe after update 2 (metrics.jsonl) and the final report of the initial and the
  trained encoder (probe.json) score as one process's do; process 0 alone logs and writes them."""
  multi, single, logs, _ = runs
  keys = ("step", "probe_acc", "probe_knn_acc")
  probes = [[row.get(k) for k in keys] for row in metric_rows(multi)]
  single_probes = [[row.get(k) for k in keys] for row in metric_rows(single)]
  assert [p[0] for p in probes if p[1] is not None] == [2]  # probe.every = 2
  # Features on the same 355 test digits are equal up to float rounding. kNN votes are then
  # equal; the linear probe's L2 is chosen on held-out accuracies that may tie, and rounding can
  # tip such a tie, so its accuracy may differ by a test scan or two (0.28 points each).
  close = 2 / 355 + 1e-9
  for (step, acc, knn), (single_step, single_acc, single_knn) in zip(
    probes, single_probes, strict=True
  ):
    assert step == single_step and knn == single_knn
    assert (acc is None) == (single_acc is None)
    assert acc is None or abs(acc - single_acc) <= close
  report = json.loads((multi / "probe.json").read_text())
  single_report = json.loads((single / "probe.json").read_text())
  for key in ("seeds", "random_knn", "pretrained_knn"):
    assert report[key] == single_report[key]
  for key in ("random", "pretrained"):
    np.testing.assert_allclose(report[key], single_report[key], atol=close, rtol=0)
  assert report["seeds"] == [0] and report["pretrained_mean"] > 0.2  # chance: 0.1
  assert "Probe: random init" in logs[0] and "Probe: " not in logs[1]


def test_checkpoint_restores_on_another_topology(runs):
  """2 processes x 2 devices with fsdp=2 -> 1 process on 1 device: the same step 3."""
  multi, single, _, root = runs
  resumed = root / "resumed"
  shutil.copytree(multi, resumed)
  shutil.rmtree(resumed / "checkpoints" / "3")
  (log,) = wait(launch(CONFIG, resumed, 1, 1, root))
  assert "Process 0 of 1; 1 local devices" in log
  assert "Resumed from step 2" in log
  assert "Data position from process_0-of-2.json" in log
  assert_states_close(restore(resumed, 3), restore(single, 3))
  np.testing.assert_allclose(losses(resumed)[-1], losses(single)[-1], rtol=1e-5)


def test_two_process_run_loads_as_pretrained_weights_in_one_process(runs):
  """Fine-tuning, extraction and conversion read a multi-host pretraining run in one process
  (`pretrained.load_pretrained`: orbax once refused this as a topology mismatch)."""
  multi, single, _, _ = runs
  run = pretrained.load_pretrained(multi)
  assert run.step == 3 and run.modality == "image"
  want = restore(single, 3).params
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6), run.params, want
  )


def test_processes_load_disjoint_rows_of_one_global_batch():
  """Each process reads only its rows of every global batch; together they read all of it."""
  config = tiny_config()
  whole = image_data.make_image_pretrain_dataset(config.input, seed=3).batches
  parts = [
    image_data.make_image_pretrain_dataset(
      config.input, seed=3, process_index=i, process_count=2
    ).batches
    for i in range(2)
  ]
  for index in (0, 5):
    rows = [part[index]["image"] for part in parts]
    assert [r.shape[0] for r in rows] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(rows), whole[index]["image"])


def test_fsdp_rule_shards_large_arrays_alike_in_student_teacher_and_adam():
  mib = 2**20
  assert sharding.leaf_spec((768, 3072), 4, 2, mib) == P(None, "fsdp")  # the larger axis
  assert sharding.leaf_spec((3072, 768), 4, 2, mib) == P("fsdp")
  assert sharding.leaf_spec((3, 768, 512), 4, 4, mib) == P(None, "fsdp")
  assert sharding.leaf_spec((768, 3070), 4, 4, mib) == P("fsdp")  # 3070 % 4 != 0
  assert sharding.leaf_spec((7, 9), 4, 2, 0) == P()  # nothing divisible
  assert sharding.leaf_spec((3072,), 4, 2, 0) == P()  # 1-D: replicated
  assert sharding.leaf_spec((64, 64), 4, 2, mib) == P()  # below the size threshold
  assert sharding.leaf_spec((768, 3072), 4, 1, 0) == P()  # fsdp=1: data parallel

  config = tiny_config()
  _, _, _, make_state = train.setup(config)
  mesh = sharding.make_mesh(fsdp=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  shardings = sharding.state_shardings(jax.eval_shape(make_state), mesh, min_mb=0.0)
  specs = lambda tree: [s.spec for s in jax.tree.leaves(tree)]  # noqa: E731
  student = specs(shardings.params)
  assert P() in student and any(s != P() for s in student)
  assert specs(shardings.teacher) == specs({k: shardings.params[k] for k in shardings.teacher})
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [x for x in jax.tree.leaves(shardings.opt_state, is_leaf=is_adam) if is_adam(x)]
  assert specs(adam.mu) == student and specs(adam.nu) == student
  replicated = sharding.state_shardings(jax.eval_shape(make_state), sharding.make_mesh(), 0.0)
  assert all(s == P() for s in specs(replicated))  # fsdp=1: as before


def test_mesh_and_batch_errors_name_the_fix():
  with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide the 4 devices"):
    sharding.make_mesh(fsdp=3)
  mesh = sharding.make_mesh(fsdp=2)
  with pytest.raises(ValueError, match="fed 4 rows; the global batch of 8"):
    sharding.put_batch({"x": np.zeros((4, 3))}, mesh, global_batch=8)
  batch = sharding.put_batch({"x": np.arange(24.0).reshape(8, 3)}, mesh, global_batch=8)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}


def test_distributed_init_args():
  """Explicit flags, then --multi_host, then a SLURM job step of several tasks; else None."""
  slurm = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
  }
  args = sharding.distributed_init_args
  assert args(environ={}) is None
  assert args(environ={**slurm, "SLURM_NTASKS": "1"}) is None  # one task: a single process
  assert args(environ=slurm) == ("SLURM job 77 (2 tasks)", {})
  assert args(multi_host=True) == ("--multi_host (cluster auto-detection)", {})
  how, kwargs = args(
    coordinator_address="h0:1234", num_processes=4, process_id=2, local_device_ids=["0", "1"]
  )
  assert how == "flags"
  assert kwargs == dict(
    coordinator_address="h0:1234", num_processes=4, process_id=2, local_device_ids=[0, 1]
  )
  assert args(process_id=3, environ=slurm) == ("flags", {"process_id": 3})
