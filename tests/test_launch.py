"""The launchers' dry runs (issue 9): the exact commands each prints, and that README's "Scaling"
examples are what the scripts print today.

A documented example is a `$ bash launch/... --dry-run ...` line in a code block of README.md's
"Scaling" section, followed by its output lines.
"""

import os
import pathlib
import re
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What would change the dry runs: a SLURM job, TPU/ZONE/PROJECT defaults.
_CLEAN_ENV = {
  k: v
  for k, v in os.environ.items()
  if not k.startswith("SLURM_") and k not in ("TPU", "ZONE", "PROJECT")
}


def dry_run(command: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    shlex.split(command),
    cwd=REPO,
    env={**_CLEAN_ENV, **(env or {})},
    capture_output=True,
    text=True,
    timeout=30,
  )


def output_of(command: str, env=None) -> list[str]:
  result = dry_run(command, env)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_local_single_process():
  assert output_of(
    "bash launch/local.sh --dry-run configs/image.py runs/image_tiny --config.loop.total_steps=3"
  ) == [
    "bash launch/setup.sh",
    ".venv/bin/python main.py --config=configs/image.py --workdir=runs/image_tiny "
    "--config.loop.total_steps=3",
  ]


def test_local_processes_join_on_localhost():
  command = (
    "bash launch/local.sh --dry-run --processes=2 --cpu_devices=2 configs/image.py runs/i2 "
    "'--config.input.crop_lengths=(4000,8000)'"
  )
  main = ".venv/bin/python main.py --config=configs/image.py --workdir=runs/i2"
  cpu = "env XLA_FLAGS=--xla_force_host_platform_device_count=2"
  join = "--coordinator_address=localhost:12355 --num_processes=2"
  crops = "'--config.input.crop_lengths=(4000,8000)'"
  assert output_of(command) == [
    "bash launch/setup.sh",
    "mkdir -p /tmp/d2v_jax_logs",
    f"{cpu} {main} {join} --process_id=0 {crops} &",
    f"{cpu} {main} {join} --process_id=1 {crops} > /tmp/d2v_jax_logs/process_1.log 2>&1 &",
    "wait",
  ]
  gpus = output_of(
    "bash launch/local.sh --dry-run --processes=2 --gpus_per_process=4 --port=999 "
    "configs/audio.py:variant=base runs/a"
  )
  assert gpus[2].endswith("--process_id=0 --local_device_ids=0,1,2,3 &")
  assert "--coordinator_address=localhost:999" in gpus[3]
  assert gpus[3].endswith("--local_device_ids=4,5,6,7 > /tmp/d2v_jax_logs/process_1.log 2>&1 &")


def test_slurm_submits_itself_and_runs_srun_in_the_job():
  args = "configs/audio.py:variant=base /shared/runs/audio_base --config.input.batch_size=512"
  main = (
    ".venv/bin/python main.py --multi_host --config=configs/audio.py:variant=base "
    "--workdir=/shared/runs/audio_base --config.input.batch_size=512"
  )
  assert output_of(
    f"bash launch/slurm_gpu.sh --dry-run --nodes=8 --gpus_per_node=8 --partition=gpu {args}"
  ) == [
    "bash launch/setup.sh",
    ".venv/bin/pip install --quiet 'jax[cuda12]==0.12.0.1'",
    "mkdir -p logs",
    "sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 --time=24:00:00 "
    f"--output=logs/d2v-jax-%j.out --partition=gpu launch/slurm_gpu.sh {args}",
    "# in the job:",
    f"srun --kill-on-bad-exit=1 {main}",
  ]
  in_job = output_of(f"bash launch/slurm_gpu.sh --dry-run {args}", env={"SLURM_JOB_ID": "7"})
  assert in_job == [f"srun --kill-on-bad-exit=1 {main}"]


def test_tpu_pod_creates_copies_sets_up_and_runs_on_every_worker():
  out = output_of(
    "bash launch/tpu_pod.sh --dry-run --tpu=d2v-v4-64 --zone=us-central2-b --accelerator=v4-64 "
    "configs/audio.py:variant=base gs://my-bucket/runs/audio_base "
    "--config.input.source=tfds --config.input.tfds_data_dir=gs://data-bucket/tfds"
  )
  tpu = "gcloud compute tpus tpu-vm"
  where = "d2v-v4-64 --zone=us-central2-b"
  assert out == [
    f"{tpu} describe {where} > /dev/null 2>&1 || \\",
    f"  {tpu} create {where} --accelerator-type=v4-64 --version=tpu-ubuntu2204-base",
    "tar czf /tmp/d2v-jax.tgz --exclude=./.venv --exclude=./.git --exclude=./runs .",
    f"{tpu} scp /tmp/d2v-jax.tgz 'd2v-v4-64:~/' --zone=us-central2-b --worker=all",
    f"{tpu} ssh {where} --worker=all --command 'mkdir -p d2v-jax && tar xzf d2v-jax.tgz -C "
    "d2v-jax && bash d2v-jax/launch/tpu_worker_setup.sh 0.12.0.1 data-bucket my-bucket'",
    f"{tpu} ssh {where} --worker=all --command 'cd d2v-jax && .venv/bin/python main.py "
    "--multi_host --config=configs/audio.py:variant=base "
    "--workdir=/gcs/my-bucket/runs/audio_base --config.input.source=tfds "
    "--config.input.tfds_data_dir=/gcs/data-bucket/tfds'",
  ]
  cloned = output_of(
    "bash launch/tpu_pod.sh --dry-run --tpu=t --zone=z --project=p --spot "
    "--repo=https://github.com/me/d2v-jax@v1 configs/image.py /mnt/shared/run"
  )
  assert cloned[1].endswith("--accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot")
  assert cloned[2] == (
    f"{tpu} ssh t --zone=z --project=p --worker=all --command 'rm -rf d2v-jax && git clone "
    "--quiet https://github.com/me/d2v-jax d2v-jax && git -C d2v-jax checkout --quiet v1 && "
    "bash d2v-jax/launch/tpu_worker_setup.sh 0.12.0.1'"
  )
  assert len(cloned) == 4 and "--workdir=/mnt/shared/run" in cloned[3]


@pytest.mark.parametrize(
  "command",
  [
    "bash launch/local.sh --dry-run configs/image.py",  # no WORKDIR
    "bash launch/local.sh --dry-run --bogus configs/image.py runs/x",
    "bash launch/slurm_gpu.sh --dry-run configs/image.py",
    "bash launch/tpu_pod.sh --dry-run configs/image.py runs/x",  # no --tpu / --zone
  ],
)
def test_bad_invocations_fail_with_usage(command):
  result = dry_run(command)
  assert result.returncode != 0
  assert "usage" in result.stderr or "required" in result.stderr


def test_worker_setup_script_parses():
  result = subprocess.run(["bash", "-n", "launch/tpu_worker_setup.sh"], cwd=REPO)
  assert result.returncode == 0


def documented_examples() -> list[tuple[str, list[str]]]:
  """(command, printed lines) of every dry-run example in README's Scaling section."""
  readme = (REPO / "README.md").read_text()
  section = re.search(r"^## Scaling\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
  assert section, "README.md has no '## Scaling' section"
  text = section.group(1)
  examples = []
  for block in re.findall(r"```(?:bash|console)?\n(.*?)```", text, re.S):
    for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
      command, *lines = chunk.rstrip("\n").split("\n")
      if "--dry-run" in command:
        examples.append((command, lines))
  return examples


def test_scaling_docs_show_what_the_launchers_print():
  examples = documented_examples()
  launchers = {re.search(r"launch/(\w+)\.sh", command).group(1) for command, _ in examples}
  assert launchers == {"local", "slurm_gpu", "tpu_pod"}
  for command, lines in examples:
    assert output_of(command) == lines, command
