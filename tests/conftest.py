"""Test setup: 4 fake CPU devices (set before jax is imported) and parsed absl flags.

grain's worker processes read absl flags, so they must count as parsed under pytest. The
longest tests (the notebooks, the multi-process runs) are collected first, so that with
`pytest -n 2` they do not all land at the end of one worker's queue.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A persistent XLA compilation cache shared by the workers, the notebooks' kernels and the
# multi-process tests' children (they inherit the environment): the suite compiles the same
# train steps many times (a resumed run, the same tiny config in several tests), and on CPU
# compilation dominates. Halves the audio resume test. Entries are keyed by the HLO, the
# compile options and the jax version, so a stale one is never used; the size is bounded.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "d2v-jax-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


# Test files whose tests take minutes each (tests/test_notebooks.py runs whole notebooks).
_LONGEST_FIRST = (
  "tests/test_notebooks.py",
  "tests/test_multihost.py",
  "tests/test_multihost_finetune.py",
  "tests/test_train.py",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)

  items.sort(key=rank)  # stable: the order within each group is kept
