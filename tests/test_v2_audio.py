"""data2vec 2.0 for speech: the model, the step and the config (spec §2; issue 8).

What is particular to speech: the positional convolution runs on the whole sequence with the
masked frames zeroed (the student learns where they are, not what they hold), ALiBi with learned
per-head scales biases every block by each kept frame's ORIGINAL distances, 1-D block masking,
and a teacher that shares the CNN and feature projection (it EMAs the positional conv, the ALiBi
scales and the context encoder).
"""

import functools

import jax
import numpy as np
import optax

from configs import audio as audio_config
from d2v_jax import masking_v2, steps_v2
from d2v_jax import state as state_lib
from d2v_jax.models import data2vec2

NUM_SAMPLES = 8000  # 24 frames


def small_config(num_clones: int = 2):
  config = audio_config.get_config("variant=tiny,version=2")
  config.model.update(num_layers=2, dim=32, num_heads=4, mlp_dim=64, conv_dim=16)
  config.model.decoder.update(dim=16, layers=2)
  config.masking.num_clones = num_clones
  config.targets.top_k = 2
  return config


@functools.cache
def _setup():
  config = small_config()
  model = data2vec2.build_model("audio", config.model)
  tx = optax.adam(1e-3)
  audio = jax.random.normal(jax.random.key(0), (2, NUM_SAMPLES))
  padding = np.zeros((2, NUM_SAMPLES), bool)
  state = state_lib.create_train_state(
    model, tx, jax.random.key(1), audio[:1], padding[:1], tuple(config.ema.teacher_params)
  )
  return config, model, tx, audio, padding, state


def test_tree_and_teacher_split():
  _, _, _, _, _, state = _setup()
  assert set(state.params) == {"frontend", "encoder", "decoder"}
  assert {"relative_positions", "alibi_scale", "blocks"} <= set(state.params["encoder"])
  assert set(state.teacher) == {"encoder"}  # the CNN and feature projection are shared
  scale = state.params["encoder"]["alibi_scale"]["alibi_scale"]
  assert scale.shape == (1, 1, 4, 1, 1) and np.all(np.asarray(scale) == 1.0)  # per head, init 1


def _frames(model, state, audio, padding):
  variables = {"params": state.params}
  return model.apply(variables, audio, padding, train=False, method=model.embed)


def test_masked_frames_are_zeroed_before_the_positional_conv():
  """The student's outputs depend on kept frames only: a masked frame's features can change
  freely, a kept one's cannot."""
  _, model, _, audio, padding, state = _setup()
  tokens, token_padding = _frames(model, state, audio, padding)
  num_frames = tokens.shape[1]
  mask = masking_v2.block_mask_1d(jax.random.key(3), 2, num_frames, block=5, ratio=0.5, adjust=0.05)
  variables = {"params": state.params}

  def student(t):
    out, _ = model.apply(
      variables, t, token_padding, mask.keep_ids, train=False, method=model.encode
    )
    return np.asarray(out)

  base = student(tokens)
  masked, kept = int(mask.masked_ids[0, 0]), int(mask.keep_ids[0, 0])
  np.testing.assert_allclose(student(tokens.at[0, masked].add(5.0)), base, atol=1e-5)
  assert not np.allclose(student(tokens.at[0, kept].add(5.0))[0], base[0], atol=1e-3)


def test_keeping_every_frame_is_the_unmasked_encoder():
  """With every frame kept, the gathered ALiBi bias and features are the full ones."""
  _, model, _, audio, padding, state = _setup()
  tokens, token_padding = _frames(model, state, audio, padding)
  variables = {"params": state.params}
  everything = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (2, 1))
  full, _ = model.apply(variables, tokens, token_padding, train=False, method=model.encode)
  kept, _ = model.apply(
    variables, tokens, token_padding, everything, train=False, method=model.encode
  )
  np.testing.assert_allclose(kept, full, atol=1e-5)


def test_step_lowers_the_loss_and_counts_masks():
  config, model, tx, audio, padding, state = _setup()
  step = jax.jit(steps_v2.make_pretrain_step(model, tx, lambda s: 1e-3, config))
  batch = {"audio": audio, "padding_mask": padding}
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch, jax.random.key(5))
    losses.append(float(metrics["loss"]))
  frames = 24
  assert int(metrics["num_masked"]) == 2 * 2 * int(frames * 0.5)  # ⌊T·R⌋ per clone
  assert losses[-1] < losses[0]


def test_recipes_carry_the_spec_numbers():
  """Base and large follow spec §2.3's audio columns; tiny is the CPU recipe (no dropout,
  gradients clipped at 1, the teacher annealed over the whole run)."""

  def fields(variant):
    c = audio_config.get_config(f"variant={variant},version=2")
    m = c.model
    dropouts = (m.dropout, m.attention_dropout, m.decoder.input_dropout, m.layerdrop)
    ema = (c.ema.decay, c.ema.end_decay, c.ema.anneal_steps)
    optim = (c.optim.lr, c.optim.warmup_steps, c.optim.clip_norm, c.optim.b2)
    mask = (c.masking.num_clones, c.masking.ratio, c.masking.adjust)
    return dropouts, ema, optim, mask, c.loop.total_steps

  assert fields("base") == (
    (0.1, 0.1, 0.1, 0.05),
    (0.999, 0.99999, 75_000),
    (7.5e-4, 8_000, 0.0, 0.98),
    (8, 0.5, 0.05),
    400_000,
  )
  assert fields("large") == (
    (0.1, 0.1, 0.1, 0.0),
    (0.9997, 1.0, 300_000),
    (4e-4, 10_000, 1.0, 0.98),
    (12, 0.55, 0.1),
    600_000,
  )
  dropouts, (_, _, anneal), (_, _, clip, _), _, steps = fields("tiny")
  assert dropouts == (0.0, 0.0, 0.0, 0.0)
  assert (clip, anneal) == (1.0, steps)
