"""Test setup: 4 fake CPU devices (set before jax is imported) and parsed absl flags.

grain's worker processes read absl flags, so they must count as parsed under pytest.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
