"""Tests for the text model (d2v_jax/models/text.py; spec §1.1 and §1.3 text).

Agreement with HF's Data2VecTextModel, layer by layer, is in test_hf_text_parity.py; these tests
pin RoBERTa's position ids, the embedding init, padding invariance and the regression head.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from d2v_jax.models import text
from d2v_jax.models.data2vec import build_model
from tests.helpers import fast_jit

PAD = 1
VOCAB = 50


def text_model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    variant="tiny",
    dtype="float32",
    num_layers=2,
    dim=32,
    num_heads=4,
    mlp_dim=64,
    vocab_size=VOCAB,
    max_positions=16,
    pad_id=PAD,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    layer_norm_eps=1e-5,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@functools.cache
def _init():
  model = build_model("text", text_model_config())
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = fast_jit(lambda k: model.init(k, tokens, tokens == PAD)["params"])(jax.random.key(0))
  return model, params


def test_position_ids_are_robertas():
  """HF's create_position_ids_from_input_ids: cumsum(non-pad) * non-pad + pad."""
  tokens = np.array([[0, 7, 8, 2, PAD, PAD], [0, 7, 7, 7, 7, 2], [PAD] * 6])
  got = np.asarray(text.position_ids(jnp.asarray(tokens == PAD), PAD))
  np.testing.assert_array_equal(got, [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1]])


def test_parameter_shapes_and_pad_rows_start_at_zero():
  _, params = _init()
  front = params["frontend"]
  assert front["token_embed"]["embedding"].shape == (VOCAB, 32)
  assert front["position_embed"]["embedding"].shape == (16 + PAD + 1, 32)  # 512 -> 514 rows
  for table in (front["token_embed"]["embedding"], front["position_embed"]["embedding"]):
    np.testing.assert_array_equal(table[PAD], 0.0)
    assert np.std(np.delete(np.asarray(table), PAD, axis=0)) == pytest.approx(0.02, rel=0.1)
  assert "mask_emb" not in params  # text masks ids with <mask>, not embeddings
  head = params["final_proj"]
  assert head["dense"]["kernel"].shape == (32, 64) and head["out"]["kernel"].shape == (64, 32)


def test_padding_does_not_change_valid_positions():
  """A padded row equals the same row alone at its tokens (positions and attention skip pads)."""
  model, params = _init()
  row = np.array([[0, 11, 12, 13, 2]])
  padded = np.array([[0, 11, 12, 13, 2, PAD, PAD, PAD]])

  @fast_jit
  def run(p, tokens):
    return model.apply({"params": p}, tokens, tokens == PAD)

  alone, aux_alone = run(params, row)
  with_pad, aux_pad = run(params, padded)
  np.testing.assert_allclose(with_pad[:, :5], alone, atol=1e-5)
  for a, b in zip(aux_alone["layers"], aux_pad["layers"], strict=True):
    np.testing.assert_allclose(b["ffn"][:, :5], a["ffn"], atol=1e-5)


def test_too_long_input_and_embedding_mask_are_errors():
  model, params = _init()
  tokens = jnp.zeros((1, 17), jnp.int32)
  with pytest.raises(ValueError, match="exceed the model's 16 positions"):
    model.apply({"params": params}, tokens, tokens == PAD)
  short = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="masks its input ids"):
    model.apply({"params": params}, short, short == PAD, jnp.ones((1, 4), bool))


def test_dropout_only_in_training():
  model, params = _init()
  tokens = jnp.asarray([[0, 5, 6, 7, 8, 2]])

  @functools.partial(fast_jit, static_argnums=2)
  def run(p, t, train, key):
    return model.apply({"params": p}, t, t == PAD, train=train, rngs={"dropout": key})[0]

  a, b = (np.asarray(run(params, tokens, False, jax.random.key(k))) for k in (1, 2))
  np.testing.assert_array_equal(a, b)
  c, d = (np.asarray(run(params, tokens, True, jax.random.key(k))) for k in (1, 2))
  assert np.abs(c - d).max() > 1e-3
