"""Device mesh and shardings for data-parallel training (DESIGN.md, "Stack").

One `Mesh` with a `data` axis over every device of every process: the batch is split on `data`,
the train state is replicated, and `jax.jit` inserts the gradient all-reduce. The same code runs
on one CPU, 4 fake CPU devices in tests, a GPU node or a TPU pod.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ValueError(
      f"config.input.batch_size={global_batch} is not divisible by the {num_devices} devices; "
      f"use a multiple of {num_devices}"
    )


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global arrays sharded over `data` (no host round trip later)."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
