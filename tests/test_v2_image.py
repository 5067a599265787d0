"""data2vec 2.0 for images: the model, the step and the config (spec §2; issue 8).

The masks are tested in test_masking_v2.py and the blocks, decoder and positions in
test_models_v2_layers.py; here what joins them: the student sees only its kept patches, the
teacher runs once per image and its targets serve the image's M clones, the CLS loss, the EMA of
everything but the decoder, and a loss that falls.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import image as image_config
from d2v_jax import masking_v2, steps, steps_v2, teacher
from d2v_jax import state as state_lib
from d2v_jax.models import data2vec2


def small_config(num_clones: int = 2) -> ml_collections.ConfigDict:
  config = image_config.get_config("variant=tiny,version=2")
  config.model.update(image_size=16, num_layers=2, dim=32, num_heads=4, mlp_dim=64)
  config.model.decoder.update(dim=16, layers=2)
  config.masking.num_clones = num_clones
  config.targets.top_k = 2
  return config


@functools.cache
def _setup(num_clones: int = 2):
  config = small_config(num_clones)
  model = data2vec2.build_model("image", config.model)
  tx = optax.adam(1e-3)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  state = state_lib.create_train_state(
    model, tx, jax.random.key(1), images[:1], None, tuple(config.ema.teacher_params)
  )
  return config, model, tx, images, state


def test_parameter_tree_and_teacher_split():
  """Student: frontend, encoder (CLS, input LayerNorm, blocks), decoder. The teacher EMAs
  everything but the decoder (spec §2.3, images)."""
  _, _, _, _, state = _setup()
  assert set(state.params) == {"frontend", "encoder", "decoder"}
  assert set(state.params["encoder"]) == {"extra_tokens", "blocks"}
  assert "input_norm" in state.params["encoder"]["blocks"]
  assert set(state.teacher) == {"frontend", "encoder"}


def test_student_sees_only_its_kept_patches():
  """Changing a masked patch leaves the student's output alone; changing a kept one does not."""
  config, model, _, images, state = _setup()
  variables = {"params": state.params}
  mask = masking_v2.block_mask_2d(
    jax.random.key(2), 4, (4, 4), block=3, ratio=0.8, adjust=0.07, inverse=True
  )
  assert mask.keep_ids.shape == (4, 3)  # ⌊16 · 0.2⌋ kept patches

  def student(x):
    tokens, padding = model.apply(variables, x, None, train=False, method=model.embed)
    out, _ = model.apply(
      variables, tokens, padding, mask.keep_ids, train=False, method=model.encode
    )
    return np.asarray(out)  # [B, K, D]

  base = student(images)
  masked_patch = int(mask.masked_ids[0, 0])
  kept_patch = int(mask.keep_ids[0, 0])

  def perturb(patch):
    r, c = divmod(patch, 4)
    return images.at[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].add(1.0)

  np.testing.assert_allclose(student(perturb(masked_patch)), base, atol=1e-6)
  assert not np.allclose(student(perturb(kept_patch))[0], base[0], atol=1e-3)


def test_teacher_targets_are_normalised_and_shared_by_the_clones():
  """One teacher pass per image: [B, N, D] targets, each position LayerNorm'd after the
  instance-normalised average; the step compares clone j of image i with image i's targets."""
  config, model, _, images, state = _setup()
  # The image teacher embeds with its own patch embedding: no student tokens needed.
  y = steps.teacher_targets(model, config, state.teacher, images, None, None, None)
  assert y.shape == (4, 16, 32)
  np.testing.assert_allclose(np.mean(np.asarray(y), -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(np.asarray(y), -1), 1.0, atol=1e-3)
  repeated = masking_v2.clone_batch(y, 3)
  np.testing.assert_array_equal(repeated[3:6], jnp.broadcast_to(y[1], (3, 16, 32)))


def test_cls_loss_matches_its_definition():
  """Σ over rows of Σ_D (cls − mean_t y)² / √D, the targets' mean repeated per clone."""
  rng = np.random.default_rng(0)
  y = rng.normal(size=(2, 5, 4)).astype(np.float32)
  cls = rng.normal(size=(6, 4)).astype(np.float32)
  padding = np.zeros((2, 5), bool)
  want = sum(
    np.sum((cls[r] - y[r // 3].mean(0)) ** 2) / 2.0  # √4
    for r in range(6)
  )
  got = steps_v2.cls_loss(jnp.asarray(cls), jnp.asarray(y), jnp.asarray(padding), 3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_step_counts_masks_moves_teacher_and_lowers_the_loss():
  config, model, tx, images, state = _setup(num_clones=2)
  step = jax.jit(steps_v2.make_pretrain_step(model, tx, lambda s: 1e-3, config))
  batch = {"image": images}
  losses = []
  first = state
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(7))
    losses.append(float(metrics["loss"]))
    if i == 0:
      # 4 images × 2 clones × (16 − 3) masked patches
      assert int(metrics["num_masked"]) == 4 * 2 * 13
      assert float(metrics["cls_loss"]) > 0
  assert losses[-1] < losses[0]
  # The EMA moved the teacher (it mirrors the student's patch embedding too, spec §2.3).
  kernel = ("frontend", "patch_embed", "projection", "kernel")

  def leaf(tree):
    for k in kernel:
      tree = tree[k]
    return np.asarray(tree)

  assert not np.allclose(leaf(state.teacher), leaf(first.teacher))


def test_config_versions():
  assert image_config.get_config("version=2").version == 2
  assert image_config.get_config("").version == 1
  with pytest.raises(ValueError, match="version=3"):
    image_config.get_config("version=3")
  with pytest.raises(NotImplementedError, match="no 'video' model"):
    data2vec2.build_model("video", small_config().model)


def test_ema_update_leaves_no_decoder_in_the_teacher():
  config, _, _, _, state = _setup()
  updated = teacher.ema_update(
    state.teacher,
    state.params,
    0.5,
    names=tuple(config.ema.teacher_params),
    copied=teacher.copy_mask(state.teacher, config.ema.copy_params),
  )
  assert set(updated) == {"frontend", "encoder"}
