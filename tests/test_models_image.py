"""Tests for the image model (d2v_jax/models/image.py; spec §1.1 vision).

Agreement with HF's Data2VecVisionModel, layer by layer, is in test_hf_image_parity.py; these
tests pin shapes, the relative position index's structure, the BEiT init and train-mode noise.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from d2v_jax.models import image
from d2v_jax.models.data2vec import build_model
from tests.helpers import fast_jit


def image_model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    variant="tiny",
    dtype="float32",
    num_layers=3,
    dim=32,
    num_heads=4,
    mlp_dim=64,
    image_size=16,
    patch_size=4,
    dropout=0.0,
    attention_dropout=0.0,
    drop_path_rate=0.0,
    layer_scale_init=0.1,
    layer_norm_eps=1e-6,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@functools.cache
def _init(**overrides):
  model = build_model("image", image_model_config(**overrides))
  size = model.frontend.image_size
  params = fast_jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), None)["params"])(
    jax.random.key(0)
  )
  return model, params


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4), (14, 14), (5, 2)])
def test_relative_position_index_shape_range_and_symmetry(grid):
  h, w = grid
  n = h * w
  index = image.relative_position_index(grid)
  rows = image.num_relative_positions(grid)
  assert index.shape == (n + 1, n + 1)
  assert index.min() >= 0 and index.max() == rows - 1
  # Every 2-D offset has its own row, and equal offsets share one.
  patch = index[1:, 1:]
  coords = [(i // w, i % w) for i in range(n)]
  for a in range(n):
    for b in range(n):
      offset = (coords[a][0] - coords[b][0], coords[a][1] - coords[b][1])
      assert patch[a, b] == (offset[0] + h - 1) * (2 * w - 1) + offset[1] + w - 1
  assert len(np.unique(patch)) == (2 * h - 1) * (2 * w - 1)
  # The three CLS rows are the last three of the table and distinct from patch offsets.
  assert {index[0, 1:].max(), index[1:, 0].max(), index[0, 0]} == {rows - 3, rows - 2, rows - 1}


def test_table_has_732_rows_at_224_with_patch_16():
  assert image.num_relative_positions(image.patch_grid(224, 16)) == 732


@pytest.mark.parametrize("image_size,patch_size", [(16, 4), (24, 8), (32, 16), (20, 4)])
def test_patch_embedding_and_encoder_shapes_follow_the_grid(image_size, patch_size):
  model, params = _init(image_size=image_size, patch_size=patch_size)
  grid = image.patch_grid(image_size, patch_size)
  n = grid[0] * grid[1]
  assert params["encoder"]["rel_pos_bias"]["table"].shape == (image.num_relative_positions(grid), 4)
  assert params["frontend"]["patch_embed"]["projection"]["kernel"].shape == (
    patch_size,
    patch_size,
    3,
    32,
  )
  images = jax.random.normal(jax.random.key(1), (2, image_size, image_size, 3))
  pred, aux = fast_jit(lambda p, x: model.apply({"params": p}, x, None))(params, images)
  assert pred.shape == (2, n, 32)
  assert aux["cls"].shape == (2, 32)
  assert len(aux["layers"]) == 3
  assert all(layer["block"].shape == (2, n, 32) for layer in aux["layers"])


def test_patches_are_row_major():
  """Token i is the patch at (i // cols, i % cols): a change in one patch moves one token."""
  model, params = _init()
  images = np.zeros((1, 16, 16, 3), np.float32)
  embed = fast_jit(
    lambda p, x: model.apply({"params": p}, x, None, train=False, method=model.embed)[0]
  )
  base = np.asarray(embed(params, images))
  images[0, 4:8, 8:12] = 1.0  # patch row 1, column 2 of a 4×4 grid
  changed = np.abs(np.asarray(embed(params, images)) - base).max(-1)[0]
  assert np.flatnonzero(changed > 0).tolist() == [1 * 4 + 2]


def test_wrong_image_size_and_grid_are_clear_errors():
  model, params = _init()
  with pytest.raises(ValueError, match=r"Expected images \[B, 16, 16, C\]"):
    model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), None)
  with pytest.raises(ValueError, match="not a multiple"):
    image.patch_grid(30, 4)


def test_init_follows_beit():
  """Linear N(0, .02); attention output and fc2 of block i rescaled by 1/sqrt(2i); γ = init."""
  model, params = _init(dim=256, mlp_dim=512, num_layers=3, layer_scale_init=1e-4)
  flat = traverse_util.flatten_dict(params, sep="/")
  for i in range(3):
    block = f"encoder/blocks/layer_{i:02d}"
    want = 0.02 / np.sqrt(2 * (i + 1))
    for name in ("attention/out/kernel", "fc2/kernel"):
      assert np.std(flat[f"{block}/{name}"]) == pytest.approx(want, rel=0.05)
    assert np.std(flat[f"{block}/fc1/kernel"]) == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(flat[f"{block}/attention_scale"], np.float32(1e-4))
    np.testing.assert_array_equal(flat[f"{block}/ffn_scale"], np.float32(1e-4))
    assert f"{block}/attention/key/bias" not in flat  # q and v biases only
    assert f"{block}/attention/query/bias" in flat and f"{block}/attention/value/bias" in flat
  np.testing.assert_array_equal(flat["encoder/rel_pos_bias/table"], 0.0)
  assert np.std(flat["mask_emb"]) == pytest.approx(0.02, rel=0.2)
  assert np.std(flat["final_proj/kernel"]) == pytest.approx(0.02, rel=0.05)


def test_layer_scale_zero_means_no_gamma():
  _, params = _init(layer_scale_init=0.0)
  assert "attention_scale" not in params["encoder"]["blocks"]["layer_00"]


def test_mask_token_replaces_masked_patches_only():
  model, params = _init()
  images = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))

  @fast_jit
  def run(p, x, mask):
    tokens, padding = model.apply({"params": p}, x, None, train=False, method=model.embed)
    return model.apply({"params": p}, tokens, padding, mask, train=False, method=model.encode)

  # Two separate arrays: jax may read a numpy argument after the call returns (zero-copy, async
  # dispatch), so one array mutated between the calls could reach the first call.
  no_mask = np.zeros((1, 16), bool)
  mask = no_mask.copy()
  mask[0, 5] = True
  plain, _ = run(params, images, no_mask)
  masked, _ = run(params, images, mask)
  other = images.at[0, 4:8, 4:8].set(7.0)  # patch 5's pixels no longer matter once masked
  masked_other, _ = run(params, other, mask)
  assert np.abs(np.asarray(masked) - np.asarray(plain)).max() > 1e-4
  np.testing.assert_allclose(masked_other, masked, atol=1e-5)


def test_drop_path_is_per_sample_and_only_in_training():
  model, params = _init(drop_path_rate=0.9, num_layers=2)
  images = jnp.tile(jax.random.normal(jax.random.key(3), (1, 16, 16, 3)), (8, 1, 1, 1))

  @functools.partial(fast_jit, static_argnums=2)
  def run(p, x, train, key):
    return model.apply({"params": p}, x, None, train=train, rngs={"dropout": key})[0]

  key = jax.random.key(4)
  eval_out = np.asarray(run(params, images, False, key))
  np.testing.assert_allclose(eval_out, np.broadcast_to(eval_out[:1], eval_out.shape), atol=1e-5)
  train_out = np.asarray(run(params, images, True, key))
  # Identical inputs, different per-sample drops: rows differ from each other and from eval.
  distinct_rows = {tuple(np.round(r.ravel()[:8], 4)) for r in train_out}
  assert len(distinct_rows) > 1
  assert np.abs(train_out - eval_out).max() > 1e-4


def test_per_layer_bias_tables_start_as_copies_of_the_shared_one():
  """BEiT fine-tuning: one relative position table per block, each a copy of the pretrained
  shared table (`pretrained.merge_encoder`); with equal tables the outputs are the shared
  model's, and a different table in one block changes them."""
  from d2v_jax import pretrained

  shared_model = build_model("image", image_model_config())
  per_layer_model = build_model("image", image_model_config(relative_bias="per_layer"))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  shared = shared_model.init(jax.random.key(1), images, None, train=False)["params"]
  shared["encoder"]["rel_pos_bias"]["table"] = jax.random.normal(jax.random.key(2), (52, 4))
  target = per_layer_model.init(jax.random.key(3), images, None, train=False)["params"]
  assert target["encoder"]["rel_pos_bias"]["table"].shape == (3, 52, 4)
  merged, _ = pretrained.merge_encoder(target, shared, groups=("frontend", "encoder"))
  np.testing.assert_array_equal(
    merged["encoder"]["rel_pos_bias"]["table"][2], shared["encoder"]["rel_pos_bias"]["table"]
  )

  def encode(model, params):  # the last block's output (the call's [0] is the regression head)
    return model.apply({"params": params}, images, None, train=False)[1]["layers"][-1]["block"]

  np.testing.assert_allclose(
    encode(per_layer_model, merged), encode(shared_model, shared), atol=1e-6, rtol=1e-6
  )
  table = merged["encoder"]["rel_pos_bias"]["table"]
  noise = jax.random.normal(jax.random.key(4), table.shape[1:])  # a constant would cancel out
  changed = jax.tree.map(lambda x: x, merged)
  changed["encoder"]["rel_pos_bias"]["table"] = table.at[1].add(noise)
  assert not np.allclose(encode(per_layer_model, changed), encode(per_layer_model, merged))


def test_unknown_relative_bias_layout_is_a_clear_error():
  with pytest.raises(ValueError, match="config.model.relative_bias='per_block'"):
    build_model("image", image_model_config(relative_bias="per_block"))
