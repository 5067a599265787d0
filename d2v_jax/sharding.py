"""Device mesh and shardings: data parallelism and FSDP on one mesh (DESIGN.md, "Stack").

One `Mesh` with axes (`data`, `fsdp`) over every device of every process; `config.loop.fsdp` is
the size of the `fsdp` axis (1 = pure data parallelism, the default):
  - the batch is split over both axes together (every device holds batch / devices rows);
  - the train state (student, EMA teacher, optimiser moments) is laid out by one shape rule,
    `leaf_spec`: an array of >= 2 dimensions and at least `config.loop.fsdp_min_mb` MiB is split
    over `fsdp` along its largest dimension that `fsdp` divides; everything else (biases, norms,
    scalars, small matrices) is replicated. Student, teacher and Adam moments of one parameter
    have the same shape, hence the same sharding, so the EMA and Adam updates are local;
  - `jax.jit` (plain jit + NamedSharding, no shard_map) inserts the all-gathers of sharded
    parameters and the reduce-scatter / all-reduce of the gradient.
With `fsdp=1` every leaf is replicated: exactly the data-parallel layout of before. The same code
runs on one CPU, 4 fake CPU devices in tests, several processes on loopback, a GPU node, a SLURM
cluster or a TPU pod.
"""

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# What jax's own SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch's leading dimension is split over both


def distributed_init_args(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids=None,
  multi_host: bool = False,
  environ=None,
) -> tuple[str, dict] | None:
  """(how the run was launched, `jax.distributed.initialize`'s keyword arguments), or None for
  a single process; main.py's flags go in.

  Explicit values come first (unset ones are left to jax's cluster detection), then
  `multi_host` (no arguments: jax finds Cloud TPU VMs and pods, SLURM, Open MPI, Kubernetes),
  then a SLURM job step of several tasks (`srun`), which needs no flag.
  """
  environ = {} if environ is None else environ
  explicit = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
    "local_device_ids": [int(i) for i in local_device_ids or ()] or None,
  }
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if explicit:
    return "flags", explicit
  if multi_host:
    return "--multi_host (cluster auto-detection)", {}
  if all(v in environ for v in _SLURM_VARIABLES) and int(environ["SLURM_NTASKS"]) > 1:
    return f"SLURM job {environ['SLURM_JOB_ID']} ({environ['SLURM_NTASKS']} tasks)", {}
  return None


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """Mesh[data, fsdp] over `devices` (default: every device of every process).

  On TPU the device order follows the physical torus (`mesh_utils.create_device_mesh`); on CPU
  and GPU it is `jax.devices()`'s, so the `fsdp` groups are consecutive devices of one process
  (one host's fast interconnect) whenever `fsdp` divides the local device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(
      f"config.loop.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices; use one of "
      f"{[d for d in range(1, len(devices) + 1) if len(devices) % d == 0]}"
    )
  shape = (len(devices) // fsdp, fsdp)
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, AXES)


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.loop.fsdp` over every device."""
  return make_mesh(fsdp=config.loop.get("fsdp", 1))


def describe(mesh: Mesh) -> str:
  """e.g. `data=2 x fsdp=2 over 4 cpu devices of 2 process(es)`."""
  axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  devices = mesh.devices.flat
  platform = next(iter(devices)).platform
  processes = len({d.process_index for d in mesh.devices.flat})
  return f"{axes} over {mesh.devices.size} {platform} devices of {processes} process(es)"


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def leaf_spec(shape, itemsize: int, fsdp: int, min_bytes: float) -> P:
  """The layout rule of every train-state leaf (see the module docstring)."""
  if fsdp == 1 or len(shape) < 2 or np.prod(shape) * itemsize < min_bytes:
    return P()
  divisible = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return P()
  _, axis = max(divisible)  # the largest divisible dimension; the last of equal ones
  return P(*([None] * axis + ["fsdp"]))


def state_shardings(abstract_state, mesh: Mesh, min_mb: float = 4.0):
  """NamedSharding per leaf of `abstract_state` (arrays or ShapeDtypeStructs), by `leaf_spec`.

  One rule for student, teacher and optimiser state, so matching leaves match in layout.
  """
  fsdp = mesh.shape["fsdp"]
  min_bytes = min_mb * 2**20

  def sharding_of(leaf):
    spec = leaf_spec(tuple(leaf.shape), np.dtype(leaf.dtype).itemsize, fsdp, min_bytes)
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding_of, abstract_state)


def train_state_shardings(make_state, mesh: Mesh, config):
  """The shardings of `make_state()`'s TrainState under `config.loop`'s FSDP settings."""
  shardings = state_shardings(jax.eval_shape(make_state), mesh, config.loop.get("fsdp_min_mb", 4.0))
  sharded = [s for s in jax.tree.leaves(shardings) if s.spec != P()]
  if sharded:
    logging.info("FSDP: %d state arrays split over `fsdp`, the rest replicated", len(sharded))
  return shardings


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ValueError(
      f"config.input.batch_size={global_batch} is not divisible by the {num_devices} devices; "
      f"use a multiple of {num_devices}"
    )
  if global_batch % jax.process_count():
    raise ValueError(
      f"config.input.batch_size={global_batch} is not divisible by the {jax.process_count()} "
      "processes"
    )


def put_batch(local_batch: dict, mesh: Mesh, global_batch: int | None = None) -> dict:
  """This process's numpy rows of the global batch -> global arrays split over the mesh.

  Every process passes its own `global_batch / process_count` rows (`batching.process_rows`), in
  process order; with `global_batch` given, any other row count is an error.
  """
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if global_batch is not None and x.shape[0] * jax.process_count() != global_batch:
      raise ValueError(
        f"process {jax.process_index()} fed {x.shape[0]} rows; the global batch of "
        f"{global_batch} over {jax.process_count()} processes needs "
        f"{global_batch // jax.process_count()}"
      )
    shape = None if global_batch is None else (global_batch, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(put, local_batch)


def put_global(tree, shardings):
  """A pytree this process holds in full (numpy, single-device arrays or PRNG keys, the same
  values on every process) -> global arrays laid out by `shardings` (one, or a pytree of them);
  each device takes its slice. `jax.device_put` cannot do this across processes."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sharding):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def local_copy(tree, mesh: Mesh):
  """A (possibly sharded, multi-process) pytree gathered into a copy on this process's first
  device, for evaluation code that jits on one device (probes, dev-set scores)."""
  gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.device_put(jax.device_get(gathered), jax.local_devices()[0])
