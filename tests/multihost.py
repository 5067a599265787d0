"""Helpers of the multi-process tests (tests/test_multihost.py: pretraining and its probe,
tests/test_multihost_finetune.py: fine-tuning).

`launch` starts real `main.py` processes joined by `jax.distributed` on loopback, each with its
own CPU devices, log file and process id; `wait` fails the test with every process's log tail
as soon as one of them fails, or when they hang; `wait_beside` runs the one-process reference
meanwhile. `assert_states_close` compares two runs' train
states leaf by leaf, `metric_rows` reads a run's metrics.jsonl.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one launch (mostly compilation)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(
  config: str,
  workdir,
  num_processes: int,
  local_devices: int,
  logs: pathlib.Path,
  **overrides,
):
  """Starts `num_processes` main.py processes of the config file `config` (relative to the
  repository) on loopback; returns [(Popen, log path)]."""
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
  }
  coordinator = f"localhost:{free_port()}"
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *flags]
    if num_processes > 1:
      cmd += [
        f"--coordinator_address={coordinator}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ]
    log = logs / f"{pathlib.Path(workdir).name}_{i}.log"
    with open(log, "w") as out:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out), log))
  return procs


def _raised(log: pathlib.Path) -> bool:
  return "Traceback (most recent call last)" in log.read_text(errors="replace")


def wait(procs) -> list[str]:
  """Waits for every process; returns their logs. Fails with every log's tail as soon as one
  process fails or prints a traceback, or when they run past TIMEOUT (a hang). Failing early
  matters: a process that raised does not exit (jax's shutdown barrier waits for its peers) and
  its peers block in their next collective, all until jax's coordination timeout, minutes later.
  """
  deadline = time.monotonic() + TIMEOUT
  try:
    while time.monotonic() < deadline:
      codes = [p.poll() for p, _ in procs]
      if all(c == 0 for c in codes) or any(c not in (0, None) for c in codes):
        break
      if any(_raised(log) for _, log in procs):
        time.sleep(2)  # the rest of the traceback
        break
      time.sleep(0.5)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for _, log in procs]
  if any(c != 0 for c in codes):  # None: killed here (a peer failed, or past TIMEOUT)
    tails = "\n".join(
      f"--- process {i} (exit {c}):\n{t[-3000:]}" for i, (c, t) in enumerate(zip(codes, texts))
    )
    pytest.fail(f"a process failed or hung:\n{tails}")
  return texts


def wait_beside(procs, reference) -> list[str]:
  """Runs `reference()` (the one-process run to compare with) while `procs` run, then `wait`s
  for them, also when the reference raised; returns their logs."""
  try:
    reference()
  finally:
    logs = wait(procs)
  return logs


def assert_states_close(a, b):
  """Same step, and student, teacher (if any) and optimiser state equal up to float rounding."""
  assert int(a.step) == int(b.step)
  paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path((a.params, a.teacher, a.opt_state)))
  leaves_b = jax.tree.leaves((b.params, b.teacher, b.opt_state))
  assert len(leaves_a) == len(leaves_b) > 10
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def metric_rows(workdir) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl`, one per logged step."""
  rows = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(row) for row in rows]
