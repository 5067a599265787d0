"""data2vec 2.0 for text: the model, the step and the config (spec §2; issue 8).

What differs from images (test_v2_image.py): no extra token, MAE random masking, the 1-D decoder
with a two-layer projection, padded rows, loss scale 1, and a teacher that shares the student's
embeddings (it EMAs the context encoder only and encodes the student's embedding output).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import text as text_config
from d2v_jax import state as state_lib
from d2v_jax import steps, steps_v2
from d2v_jax.models import data2vec2

VOCAB, LENGTH = 50, 12


def small_config(num_clones: int = 2):
  config = text_config.get_config("variant=tiny,version=2")
  config.model.update(
    vocab_size=VOCAB, max_positions=LENGTH, num_layers=2, dim=32, num_heads=4, mlp_dim=64
  )
  config.model.decoder.update(dim=16, layers=2, kernel=3)
  config.masking.num_clones = num_clones
  config.targets.top_k = 2
  return config


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, VOCAB, size=(3, LENGTH)).astype(np.int32)
  padding = np.zeros((3, LENGTH), bool)
  padding[1, 8:] = True  # a shorter row
  tokens[padding] = 1  # <pad>
  tokens[:, 0] = 0  # <s>
  return {"tokens": jnp.asarray(tokens), "padding_mask": jnp.asarray(padding)}


@functools.cache
def _setup():
  config = small_config()
  model = data2vec2.build_model("text", config.model)
  tx = optax.adam(1e-3)
  batch = _batch()
  state = state_lib.create_train_state(
    model,
    tx,
    jax.random.key(1),
    batch["tokens"][:1],
    batch["padding_mask"][:1],
    tuple(config.ema.teacher_params),
  )
  return config, model, tx, batch, state


def test_tree_and_shared_embeddings():
  """No extra token; the teacher holds the context encoder only (the embeddings are shared)."""
  _, _, _, _, state = _setup()
  assert set(state.params) == {"frontend", "encoder", "decoder"}
  assert "extra_tokens" not in state.params["encoder"]
  assert set(state.teacher) == {"encoder"}
  assert "proj_0" in state.params["decoder"]  # the two-layer projection


def test_teacher_encodes_the_students_embeddings():
  config, model, _, batch, state = _setup()
  variables = {"params": state.params}
  tokens, padding = model.apply(
    variables, batch["tokens"], batch["padding_mask"], train=False, method=model.embed
  )
  y = steps.teacher_targets(model, config, state.teacher, None, None, tokens, padding)
  assert y.shape == (3, LENGTH, 32)
  other = steps.teacher_targets(model, config, state.teacher, None, None, tokens * 2, padding)
  assert not np.allclose(y, other)


def test_step_masks_valid_tokens_only_and_lowers_the_loss():
  config, model, tx, batch, state = _setup()
  step = jax.jit(steps_v2.make_pretrain_step(model, tx, lambda s: 1e-3, config))
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch, jax.random.key(3))
    losses.append(float(metrics["loss"]))
    assert "cls_loss" not in metrics
    # ⌊12 · 0.48⌋ = 5 masked positions per clone; the loss counts the unpadded ones only.
    assert int(metrics["num_masked"]) <= 3 * 2 * (LENGTH - int(LENGTH * 0.52))
  assert losses[-1] < losses[0]


def test_config_versions():
  config = text_config.get_config("version=2")
  assert config.version == 2 and config.loss.scale == 1.0
  assert config.model.max_positions == config.input.max_length
  assert text_config.get_config("").version == 1
  # 2.0 sets its own block length instead of inheriting 1.0's (tiny: 32 x 64 against 8 x 128).
  assert (config.input.batch_size, config.input.max_length) == (32, 64)
  version1 = text_config.get_config("")
  assert (version1.input.batch_size, version1.input.max_length) == (8, 128)
  assert text_config.get_config("variant=base,version=2").model.max_positions == 512
