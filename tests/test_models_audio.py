"""Tests for d2v_jax/models/audio.py and the Data2Vec wrapper on a tiny audio model (spec §1.1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.models import audio
from tests import helpers

KERNELS = (10, 3, 3, 3, 3, 2, 2)
STRIDES = (5, 2, 2, 2, 2, 2, 2)


def np_output_length(length: int) -> int:
  """⌊(L − k)/s⌋ + 1 per conv layer (wav2vec2's `_get_feat_extract_output_lengths`); 0 if short."""
  for k, s in zip(KERNELS, STRIDES):
    if length < k:
      return 0
    length = (length - k) // s + 1
  return length


def test_output_lengths_formula_many_lengths():
  lengths = list(range(0, 2000)) + [4000, 9000, 12000, 15999, 16000, 16001, 160_000, 250_000]
  want = np.array([np_output_length(n) for n in lengths])
  assert (want[:400] == 0).all() and want[400] == 1 and want[719] == 1 and want[720] == 2
  assert want[lengths.index(16000)] == 49
  # Python ints, numpy arrays and jax arrays (also under jit).
  assert [audio.output_lengths(int(n)) for n in lengths] == want.tolist()
  np.testing.assert_array_equal(audio.output_lengths(np.array(lengths)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(audio.output_lengths)(jnp.array(lengths))), want)


def test_output_lengths_equal_the_feature_extractor_output():
  """Shapes for many lengths (traced only), values for one (compiled)."""
  fe = audio.FeatureExtractor(conv_dim=8)
  params = jax.eval_shape(lambda: fe.init(jax.random.key(0), jnp.zeros((1, 400))))
  for n in (400, 719, 720, 1000, 3333, 9000, 16000, 16001, 32000):
    out = jax.eval_shape(fe.apply, params, jax.ShapeDtypeStruct((2, n), jnp.float32))
    assert out.shape == (2, np_output_length(n), 8), n


def test_frame_padding_mask():
  total = 16000
  valid = np.array([16000, 12000, 9000, 720, 399, 0])
  pad = np.arange(total)[None, :] >= valid[:, None]
  got = np.asarray(audio.frame_padding_mask(jnp.asarray(pad)))
  assert got.shape == (len(valid), 49)
  want = np.arange(49)[None, :] >= np.array([np_output_length(int(n)) for n in valid])[:, None]
  np.testing.assert_array_equal(got, want)
  assert got.sum(1).tolist() == [0, 12, 22, 47, 49, 49]
  # The receptive field (400 samples, hop 320) of every valid frame lies inside the valid samples.
  for n, row in zip(valid, got):
    last_valid = int((~row).sum()) - 1
    assert last_valid < 0 or 320 * last_valid + 400 <= n


@functools.cache
def _forward_fn(train: bool):
  model = helpers.tiny_model()

  def forward(params, x, pad, mask, key):
    rngs = {"dropout": key} if train else {}
    return model.apply({"params": params}, x, pad, mask, train=train, rngs=rngs)

  return helpers.fast_jit(forward)


def _forward(x, pad, mask=None, key=None):
  """(predictions, aux) of the tiny model; train mode (dropout) when a key is given."""
  return _forward_fn(key is not None)(helpers.tiny_params(), x, pad, mask, key)


def _clip(n=9000, seed=0):
  audio_, _ = helpers.speech_like(np.random.default_rng(seed), (n,), n)
  return audio_


def _padded_pair(n=9000, total=16000):
  """A clip alone, and the same clip padded to `total` with junk in the padding."""
  clip = _clip(n)
  padded = np.random.default_rng(1).normal(size=(1, total)).astype(np.float32)
  padded[:, :n] = clip
  return clip, padded, np.arange(total)[None, :] >= n


def test_padded_and_unpadded_frontend_features_match():
  """The CNN + projection at valid frames ignore the padding (receptive field inside the clip)."""
  model, params = helpers.tiny_model(), helpers.tiny_params()
  embed = helpers.fast_jit(
    lambda p, x, pad: model.apply({"params": p}, x, pad, train=False, method=model.embed)
  )
  clip, padded, pad = _padded_pair()
  tok_a, pad_a = embed(params, clip, np.zeros(clip.shape, bool))
  tok_b, pad_b = embed(params, padded, pad)
  n = np_output_length(9000)
  assert not np.asarray(pad_a).any() and np.asarray(pad_b).sum() == 49 - n
  np.testing.assert_allclose(np.asarray(tok_a), np.asarray(tok_b)[:, :n], atol=1e-5)


def test_padded_and_unpadded_inputs_give_the_same_outputs_at_valid_frames():
  """A 9000-sample clip alone vs padded to 16000 (junk in the padding): same encoder input, same
  block outputs and same predictions at its 27 valid frames (HF#25621)."""
  clip, padded, pad = _padded_pair()
  alone = jax.device_get(_forward(jnp.asarray(clip), jnp.zeros(clip.shape, bool)))
  inside = jax.device_get(_forward(jnp.asarray(padded), jnp.asarray(pad)))
  n = np_output_length(9000)
  assert alone[0].shape == (1, n, 32) and inside[0].shape == (1, 49, 32)
  diffs = {
    "encoder input": np.abs(alone[1]["input"] - inside[1]["input"][:, :n]).max(),
    **{
      f"layer {i} {k}": np.abs(a[k] - b[k][:, :n]).max()
      for i, (a, b) in enumerate(zip(alone[1]["layers"], inside[1]["layers"]))
      for k in ("ffn", "block")
    },
    "prediction": np.abs(alone[0] - inside[0][:, :n]).max(),
  }
  bad = {k: f"{v:.3g}" for k, v in diffs.items() if not v <= 1e-5}
  assert not bad, f"padded vs unpadded max abs diff at valid frames > 1e-5: {bad}"


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
  clip = jnp.asarray(_clip(4000, seed=2))
  pad = jnp.zeros(clip.shape, bool)
  out_a, _ = _forward(clip, pad)
  out_b, _ = _forward(clip, pad)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  tr_a, _ = _forward(clip, pad, key=jax.random.key(0))
  tr_a2, _ = _forward(clip, pad, key=jax.random.key(0))
  tr_b, _ = _forward(clip, pad, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(tr_a), np.asarray(tr_a2))
  assert np.abs(np.asarray(tr_a) - np.asarray(tr_b)).max() > 1e-3
  assert np.abs(np.asarray(tr_a) - np.asarray(out_a)).max() > 1e-3


def test_mask_replaces_tokens_with_mask_emb():
  """The masked run equals the unmasked run on tokens where masked frames are `mask_emb`."""
  model = helpers.tiny_model()
  params = helpers.tiny_params()
  clip = jnp.asarray(_clip(4000, seed=3))
  pad = jnp.zeros(clip.shape, bool)

  @helpers.fast_jit
  def both(p, x, pad, mask):
    tokens, frame_pad = model.apply({"params": p}, x, pad, train=False, method=model.embed)
    by_hand = jnp.where(mask[..., None], p["mask_emb"], tokens)
    ref, _ = model.apply({"params": p}, by_hand, frame_pad, train=False, method=model.encode)
    out, _ = model.apply({"params": p}, tokens, frame_pad, mask, train=False, method=model.encode)
    plain, _ = model.apply({"params": p}, tokens, frame_pad, train=False, method=model.encode)
    return ref, out, plain

  mask = jnp.zeros((1, np_output_length(4000)), bool).at[0, 3:9].set(True)
  ref, out, plain = both(params, clip, pad, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
  assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-3


def test_parameter_names_are_stable():
  names = set(helpers.flat(helpers.tiny_params()))
  for name in (
    "frontend/feature_extractor/conv_0/kernel",
    "frontend/feature_extractor/conv_6/kernel",
    "frontend/feature_extractor/norm_0/scale",
    "frontend/feature_norm/scale",
    "frontend/projection/kernel",
    "encoder/pos_conv/conv_0/kernel",
    "encoder/pos_conv/conv_4/bias",
    "encoder/layer_norm/scale",
    "encoder/blocks/layer_00/attention/query/kernel",
    "encoder/blocks/layer_00/attention/key/bias",
    "encoder/blocks/layer_01/attention/out/kernel",
    "encoder/blocks/layer_01/fc1/kernel",
    "encoder/blocks/layer_01/fc2/bias",
    "encoder/blocks/layer_01/attention_norm/scale",
    "encoder/blocks/layer_01/ffn_norm/bias",
    "mask_emb",
    "final_proj/kernel",
    "final_proj/bias",
  ):
    assert name in names, name
  # No conv bias in the feature extractor (conv_bias=False), as fairseq's.
  assert not any(
    n.startswith("frontend/feature_extractor/conv_") and n.endswith("bias") for n in names
  )
  assert not any("layer_02" in n for n in names)  # 2 layers


def test_parameter_shapes_and_mask_emb_init():
  p = helpers.flat(helpers.tiny_params())
  assert p["frontend/feature_extractor/conv_0/kernel"].shape == (10, 1, 16)
  assert p["frontend/feature_extractor/conv_6/kernel"].shape == (2, 16, 16)
  assert p["frontend/projection/kernel"].shape == (16, 32)
  assert p["encoder/pos_conv/conv_0/kernel"].shape == (19, 32 // 16, 32)  # groups 16
  assert p["encoder/blocks/layer_00/fc1/kernel"].shape == (32, 64)
  assert p["final_proj/kernel"].shape == (32, 32)
  emb = p["mask_emb"]
  assert emb.shape == (32,) and (emb >= 0).all() and (emb < 1).all() and emb.std() > 0.1


def test_pos_conv_even_kernel_keeps_length():
  """SamePad: an even kernel yields one extra frame, which is trimmed."""
  x = jnp.ones((2, 7, 32))
  for k in (18, 19):
    m = audio.ConvPositionalEncoding(depth=2, kernel_size=k, groups=16)
    out = jax.eval_shape(lambda m=m: m.init_with_output(jax.random.key(0), x)[0])
    assert out.shape == x.shape, k


def test_shortest_clip_gives_one_frame():
  n = 400
  out, aux = _forward(jnp.asarray(_clip(n, seed=4)), jnp.zeros((1, n), bool))
  assert out.shape == (1, np_output_length(n), 32)
  assert np.isfinite(np.asarray(out)).all()
  assert len(aux["layers"]) == 2
