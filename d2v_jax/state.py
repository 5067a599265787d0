"""The train state: exactly what a checkpoint holds (DESIGN.md, "Core contracts").

No optimiser object and no RNG key live here: the optimiser is rebuilt from the config and each
step's keys are `fold_in(loop_key, step)`, so a restored state continues bit-for-bit.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from d2v_jax import teacher as teacher_lib


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any  # student parameters
  teacher: Any  # EMA teacher parameters (None when fine-tuning)
  opt_state: optax.OptState


def create_train_state(model, tx, init_key, example_inputs, example_padding, teacher_names=None):
  """Initialises student, teacher (a copy of the student's `teacher_names` subtrees) and Adam."""
  params = model.init({"params": init_key}, example_inputs, example_padding, train=False)["params"]
  teacher = None if teacher_names is None else teacher_lib.init_teacher(params, teacher_names)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, teacher=teacher, opt_state=tx.init(params)
  )
