"""Layer-by-layer parity of our speech encoder with HF `Data2VecAudioModel` (spec §1.1 audio, §4).

Three kinds of test:
- Fixture tests (always run, no torch): `fixtures/hf_audio_small.npz` holds a random HF model's
  state dict, inputs and activations. We convert the weights with `d2v_jax.convert.hf_audio`, run
  our model in fp32 and compare, at valid frames, the CNN features, the projection LayerNorm
  output (HF `extract_features`), the projected features, `hidden_states[0..L]`, every block's FFN
  output before the residual (the data2vec regression targets) and a run with `mask_time_indices`
  (which exercises `masked_spec_embed` -> `mask_emb`). Negative controls check that the comparison
  notices a swapped or permuted weight.
- Padded rows: our positional convolution zeroes padded frames before every layer, HF's (like
  fairseq's) only before the first, so HF's padded rows differ from the same clips unpadded (HF
  issue 25621) and ours do not. The reference for a padded row is therefore HF run on that row's
  valid samples alone (see the fixture script); a row without padding keeps HF's batched output.
  `test_fixture_documents_hf_padding_leak` checks, on HF's stored padded run, that HF itself moves
  by far more than TOL there while we stay within TOL of the unpadded run.
- Converter error tests: unknown, missing and mis-shaped keys and unsupported configs raise
  errors that name them.
- Live tests (`@pytest.mark.torch`): fresh random HF models of other shapes (even pos-conv kernel,
  no `masked_spec_embed`, 768 wide, and the base shape). torch needs Python 3.11 and is not a
  dependency, so these tests run `fixtures/make_hf_audio_fixture.py` under a torch interpreter in
  a subprocess and compare its arrays in-process (the interpreter: see `tests/hf_parity.py`; with
  none they skip). See the fixture script's docstring for setting up `.venv-torch`, then:

      .venv/bin/python -m pytest tests/test_hf_audio_parity.py -m torch
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.convert import common, hf_audio
from tests import hf_parity
from tests.hf_parity import TOL, load_reference, max_abs_diffs

# HF's padded run must differ from its unpadded run by more than this at valid frames of padded
# rows, from the positional convolution on (measured on the fixture: 0.35 to 2.6).
HF_LEAK_MIN = 1e-3
# Tensors computed before the positional convolution, where padding cannot leak in HF either.
BEFORE_POS_CONV = ("out/cnn", "out/extract_features", "out/projected")
FIXTURE = hf_parity.AUDIO_FIXTURE
FIXTURE_SCRIPT = hf_parity.FIXTURES / "make_hf_audio_fixture.py"


@functools.cache
def _forward(model):
  """Jitted forward of `model` returning our tensors under the fixture's names (HF layout)."""

  def capture(module, method_name):
    return method_name == "__call__" and module.name in ("feature_extractor", "feature_norm")

  @jax.jit
  def forward(params, audio, padding_mask, mask):
    (_, aux), state = model.apply(
      {"params": params}, audio, padding_mask, mask, train=False, capture_intermediates=capture
    )
    frontend = state["intermediates"]["frontend"]
    tokens, frame_padding = model.apply(
      {"params": params}, audio, padding_mask, train=False, method="embed"
    )
    out = {
      "out/frame_mask": ~frame_padding,
      "out/cnn": frontend["feature_extractor"]["__call__"][0],
      "out/extract_features": frontend["feature_norm"]["__call__"][0],
      "out/projected": tokens,
      "out/hidden_states/0": aux["input"],
    }
    return {**out, **hf_parity.layer_outputs(aux, "out/")}

  return forward


def run_ours(model, params, ref):
  """Our outputs for the reference inputs: unmasked run, plus the masked run if HF made one."""
  audio = jnp.asarray(ref["input/values"])
  padding_mask = jnp.asarray(ref["input/attention_mask"] == 0)  # ours is True at padding
  forward = _forward(model)
  ours = jax.device_get(forward(params, audio, padding_mask, None))
  if "masked/hidden_states/0" in ref:
    masked = forward(params, audio, padding_mask, jnp.asarray(ref["input/mask_time_indices"]))
    ours.update(
      {
        k.replace("out/", "masked/"): v
        for k, v in jax.device_get(masked).items()
        if k.startswith("out/hidden_states/")
      }
    )
  return ours


def reference_names(ref):
  """Names of the reference tensors: everything under `out/` and `masked/` but the frame mask."""
  return [k for k in ref if k.startswith(("out/", "masked/")) and k != "out/frame_mask"]


def cropped_rows(ref):
  """Rows with padding, whose reference is HF's run on the valid samples alone."""
  lengths = ref["input/attention_mask"].sum(1)
  return [int(b) for b in np.flatnonzero(lengths < ref["input/values"].shape[1])]


def valid_diffs(ours, ref, rows=None):
  """{tensor name: max abs difference at valid frames} over every float tensor HF stored.

  The reference is NaN at the padded frames of cropped rows, so any comparison that strayed
  outside the valid frames would report NaN and fail. `rows` restricts it to those batch rows.
  """
  valid = ref["out/frame_mask"].copy()
  if rows is not None:
    valid[np.setdiff1d(np.arange(len(valid)), rows)] = False
  return max_abs_diffs(ours, {k: ref[k] for k in reference_names(ref)}, where=valid)


def assert_parity(ours, ref):
  assert np.array_equal(ours["out/frame_mask"], ref["out/frame_mask"]), (
    "frame padding mask differs from HF's feature-level attention mask:\n"
    f"ours valid frames {ours['out/frame_mask'].sum(1)}, HF {ref['out/frame_mask'].sum(1)}"
  )
  return hf_parity.assert_within_tol(valid_diffs(ours, ref))


def check_reference_layout(ref):
  """The fixture script's reference: NaN exactly at the padded frames of cropped rows, finite at
  valid frames, and HF's batched output on rows without padding."""
  valid = ref["out/frame_mask"]
  rows = cropped_rows(ref)
  for k in reference_names(ref):
    finite = np.isfinite(ref[k]).all(-1)
    assert finite[valid].all(), f"{k}: non-finite reference at valid frames"
    for b in range(len(valid)):
      if b in rows:
        assert np.isnan(ref[k][b][~valid[b]]).all(), f"{k}: row {b} padded frames not NaN"
      else:
        np.testing.assert_array_equal(ref[k][b], ref[f"hf_padded/{k}"][b], err_msg=k)


def hf_padded_diffs(ref):
  """{tensor name: max abs difference of HF's padded run from its unpadded run} over the valid
  frames of the cropped rows."""
  padded = {k: ref[f"hf_padded/{k}"] for k in reference_names(ref)}
  return valid_diffs(padded, ref, rows=cropped_rows(ref))


# ----------------------------------------------------------------------------- fixture tests


small = hf_parity.small_fixture(hf_audio, FIXTURE)


def test_fixture_config_maps_every_size(small):
  cfg = small["model_cfg"]
  got = {k: cfg[k] for k in ("num_layers", "dim", "num_heads", "mlp_dim", "conv_dim")}
  assert got == dict(num_layers=3, dim=64, num_heads=4, mlp_dim=128, conv_dim=32)
  # HF's `num_conv_pos_embeddings` is the number of pos-conv layers, not a kernel size.
  assert (cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups) == (5, 19, 16)
  assert (cfg.dropout, cfg.attention_dropout, cfg.layerdrop, cfg.dtype) == (0, 0, 0, "float32")


def test_fixture_has_padding_and_masking(small):
  """Guards the fixture itself: padding and the masked run must actually be exercised."""
  ref = small["ref"]
  assert ref["input/attention_mask"].sum(1).tolist() == [12000, 9000]
  assert ref["out/frame_mask"].sum(1).tolist() == [37, 27]
  assert "masked/hidden_states/0" in ref and ref["input/mask_time_indices"].any()
  assert cropped_rows(ref) == [1]
  assert all(f"hf_padded/{k}" in ref for k in reference_names(ref))
  check_reference_layout(ref)
  hf_parity.assert_versions_recorded(ref)


def test_fixture_parity(small):
  ours = run_ours(small["model"], small["params"], small["ref"])
  diffs = assert_parity(ours, small["ref"])
  assert len(diffs) == 4 + 2 * 3 + 4  # cnn, features, projected, h0; ffn+block x 3; masked h0..h3


def test_fixture_documents_hf_padding_leak(small):
  """Why the padded row's reference is HF's unpadded run: HF's own padded run differs from it.

  HF zeroes padded frames only before the first pos-conv layer, so from the positional encoding
  on its padded row moves by far more than TOL (issue 25621); before it, padding changes nothing.
  Ours stays within TOL of the unpadded run on that row, and so is far from HF's padded output.
  """
  ref, rows = small["ref"], cropped_rows(small["ref"])
  hf = hf_padded_diffs(ref)
  ours = run_ours(small["model"], small["params"], ref)
  ours_vs_unpadded = valid_diffs(ours, ref, rows=rows)
  hf_padded = {k: ref[f"hf_padded/{k}"] for k in reference_names(ref)}
  ours_vs_hf_padded = valid_diffs(ours, {**ref, **hf_padded}, rows=rows)
  report = "\n".join(
    f"  {k}: HF padded {hf[k]:.3g}, ours {ours_vs_unpadded[k]:.3g}, "
    f"ours vs HF padded {ours_vs_hf_padded[k]:.3g}"
    for k in sorted(hf)
  )
  for k in hf:
    assert ours_vs_unpadded[k] <= TOL, f"{k}: ours is not the unpadded run\n{report}"
    if k in BEFORE_POS_CONV:
      assert hf[k] <= TOL, f"{k}: HF's padding changed features before pos-conv\n{report}"
    else:
      assert hf[k] > HF_LEAK_MIN, f"{k}: HF's padded run no longer leaks\n{report}"
      assert ours_vs_hf_padded[k] > HF_LEAK_MIN, f"{k}\n{report}"


def _perturb(state_dict, name):
  sd = dict(state_dict)
  layer = "encoder.layers.1.attention"
  if name == "swap_q_k":
    for p in ("weight", "bias"):
      hf_parity.swap(sd, f"{layer}.q_proj.{p}", f"{layer}.k_proj.{p}")
  elif name == "permute_heads_v":  # a head-split mix-up: v's heads rotated, out_proj's not
    for p in ("weight", "bias"):
      sd[f"{layer}.v_proj.{p}"] = np.roll(sd[f"{layer}.v_proj.{p}"], 16, axis=0)
  elif name == "flip_pos_conv_taps":  # convolution vs cross-correlation
    key = "encoder.pos_conv_embed.layers.2.conv.weight"
    sd[key] = sd[key][..., ::-1]
  elif name == "reset_cnn_norm_scale":  # what a dropped LayerNorm scale would look like
    key = "feature_extractor.conv_layers.3.layer_norm.weight"
    sd[key] = np.ones_like(sd[key])
  return sd


@pytest.mark.parametrize(
  "perturbation", ["swap_q_k", "permute_heads_v", "flip_pos_conv_taps", "reset_cnn_norm_scale"]
)
def test_fixture_detects_wrong_weights(small, perturbation):
  """Negative control: a plausible conversion mistake must break parity by far more than TOL."""
  params = hf_audio.params_from_hf(
    _perturb(small["state_dict"], perturbation), small["hf_config"], init_params=small["params"]
  )
  ours = run_ours(small["model"], params, small["ref"])
  last = "out/hidden_states/3"
  worst = valid_diffs(ours, small["ref"])[last]
  assert worst > 100 * TOL, f"{perturbation} changed {last} by only {worst:.3g}"


# ----------------------------------------------------------------------------- converter errors


ckpt = hf_parity.ckpt_fixture(FIXTURE)


def test_converter_without_init_params_leaves_out_final_proj(ckpt):
  params = hf_audio.params_from_hf(*ckpt)
  assert "final_proj" not in params
  np.testing.assert_array_equal(params["mask_emb"], ckpt[0]["masked_spec_embed"])
  # Layout spot checks: Linear transposed, q split as [D, H, Dh], Conv as [k, in/groups, out].
  q = ckpt[0]["encoder.layers.0.attention.q_proj.weight"]
  np.testing.assert_array_equal(
    params["encoder"]["blocks"]["layer_00"]["attention"]["query"]["kernel"][:, 1, :],
    q[16:32].T,
  )
  assert params["encoder"]["pos_conv"]["conv_0"]["kernel"].shape == (19, 4, 64)


def test_converter_keeps_final_proj_from_init(small):
  """`build_from_hf` fills what HF lacks from our init, and checks every other leaf's shape."""
  audio_in = jnp.zeros((1, 400)), jnp.zeros((1, 400), bool)
  init = common.init_shapes_and_head(small["model"], audio_in, seed=7)
  params = hf_audio.params_from_hf(small["state_dict"], small["hf_config"], init_params=init)
  np.testing.assert_array_equal(params["final_proj"]["kernel"], init["final_proj"]["kernel"])
  np.testing.assert_array_equal(params["mask_emb"], small["state_dict"]["masked_spec_embed"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  hf_parity.assert_rejects_extra_leaf(hf_audio, small, init)


@pytest.mark.parametrize(
  "key, value, expected",
  [
    ("encoder.layers.2.feed_forward.output_dense.bias", None, "missing keys"),
    ("masked_spec_embed", None, "missing keys"),  # required: the config has mask_time_prob > 0
    ("encoder.extra.weight", np.zeros(3), "unknown keys"),
    ("encoder.layers.1.attention.k_proj.weight", np.zeros((64, 32)), "mis-shaped keys"),
  ],
  ids=["missing", "missing_mask_emb", "unknown", "misshaped"],
)
def test_converter_names_offending_keys(ckpt, key, value, expected):
  hf_parity.assert_names_offending_key(hf_audio, ckpt, key, value, expected)


def test_converter_reports_all_problems_at_once(ckpt):
  weight_g = "encoder.pos_conv_embed.layers.0.conv.weight_g"
  message = hf_parity.conversion_error(
    hf_audio,
    ckpt,
    drop=["feature_projection.projection.bias"],
    add={weight_g: np.zeros((1, 1, 19))},
  )
  assert "feature_projection.projection.bias" in message
  assert "conv.weight_g" in message and "weight-norm" in message


def test_converter_task_model_prefix(ckpt):
  """A `Data2VecAudioForCTC` state dict: base keys under a prefix, the CTC head is not dropped."""
  state_dict = {hf_audio.TASK_MODEL_PREFIX + k: v for k, v in ckpt[0].items()}
  params = hf_audio.params_from_hf(state_dict, ckpt[1], prefix=hf_audio.TASK_MODEL_PREFIX)
  assert "mask_emb" in params
  state_dict["lm_head.weight"] = np.zeros((32, 64))
  with pytest.raises(hf_audio.ConversionError, match="lm_head.weight"):
    hf_audio.params_from_hf(state_dict, ckpt[1], prefix=hf_audio.TASK_MODEL_PREFIX)


def test_converter_mask_emb_optional_without_specaugment(ckpt):
  state_dict = dict(ckpt[0])
  del state_dict["masked_spec_embed"]
  config = {**ckpt[1], "mask_time_prob": 0.0, "mask_feature_prob": 0.0}
  assert "mask_emb" not in hf_audio.params_from_hf(state_dict, config)


@pytest.mark.parametrize(
  "override, expected",
  [
    (dict(conv_bias=True), "conv_bias"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
    (dict(layer_norm_eps=1e-12), "layer_norm_eps"),
    (dict(conv_dim=[32] * 6 + [64]), "conv_dim"),
    (dict(conv_stride=[5, 2, 2, 2, 2, 2, 1]), "conv_stride"),
    (dict(add_adapter=True), "add_adapter"),
    (dict(model_type="wav2vec2"), "model_type"),
  ],
)
def test_config_rejects_unsupported_options(ckpt, override, expected):
  with pytest.raises(hf_audio.ConversionError, match=expected):
    hf_audio.config_from_hf({**ckpt[1], **override})


# ----------------------------------------------------------------------------- live HF models


_WIDE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, conv_dim=[512] * 7)
LIVE_CONFIGS = {
  # Even pos-conv kernel (HF trims one frame, ours too), 3 pos-conv layers, 8 groups, 6 heads, no
  # `masked_spec_embed` (mask probabilities 0), three waveforms including a 1000-sample one.
  "even_kernel": (
    dict(
      hidden_size=96,
      num_hidden_layers=2,
      num_attention_heads=6,
      intermediate_size=160,
      conv_dim=[48] * 7,
      num_conv_pos_embeddings=3,
      conv_pos_kernel_size=16,
      num_conv_pos_embedding_groups=8,
      mask_time_prob=0.0,
      mask_feature_prob=0.0,
    ),
    "14000,6401,1000",
    14000,
  ),
  "wide_2_layers": (dict(_WIDE, num_hidden_layers=2), "12000,7000", 12000),
  # The base shape (12 x 768, CNN 512): ~30-40 s on 2 cores, half of it the torch subprocess.
  "base": (dict(_WIDE, num_hidden_layers=12), "8000,5000", 8000),
}


@pytest.mark.torch
@pytest.mark.parametrize(
  "name",
  [
    "even_kernel",
    "wide_2_layers",
    pytest.param("base", marks=pytest.mark.slow),
  ],
)
def test_live_hf_parity(name, tmp_path):
  overrides, lengths, num_samples = LIVE_CONFIGS[name]
  out = tmp_path / f"{name}.npz"
  args = ["--out", str(out), "--config", json.dumps(overrides)]
  args += ["--lengths", lengths, "--num-samples", str(num_samples)]
  hf_parity.run_fixture_script(FIXTURE_SCRIPT, args)

  state_dict, hf_config, ref = load_reference(out)
  assert cropped_rows(ref), "the live inputs must include a padded row"
  check_reference_layout(ref)
  # HF's padding leak is documented on the fixture only: here HF's padded run merely must not
  # change anything before the positional convolution.
  leak = hf_padded_diffs(ref)
  assert all(leak[k] <= TOL for k in BEFORE_POS_CONV), leak
  model, _, params = hf_audio.build_from_hf(state_dict, hf_config)
  assert_parity(run_ours(model, params, ref), ref)


def test_export_round_trip(small):
  """params_to_hf inverts params_from_hf exactly; `final_proj` has no HF counterpart."""
  fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  fields += ("conv_dim", "num_conv_pos_embeddings", "conv_pos_kernel_size")
  hf_parity.assert_export_round_trip(hf_audio, small, (*fields, "num_conv_pos_embedding_groups"))
