"""Layer-by-layer parity of our image encoder with HF `Data2VecVisionModel` (spec §1.1 vision, §4).

Three kinds of test:
- Fixture tests (always run, no torch): `fixtures/hf_image_small.npz` holds a random HF model's
  state dict (shared relative position bias, LayerScale, mask token, final LayerNorm; every
  parameter re-drawn so none is 0, 1 or constant), images and activations. We convert the weights
  with `d2v_jax.convert.hf_image`, run our model in fp32 and compare, at the patch positions, the
  encoder input (HF `hidden_states[0]`), every block's output (`hidden_states[1..L]`, the v1
  vision targets), every FFN output before LayerScale, the final output (`last_hidden_state`) and,
  for the CLS token our encoder hides, `aux["cls"]` against `last_hidden_state[:, 0]` and the
  pooler output; once as is and once with `bool_masked_pos` (which exercises
  `embeddings.mask_token` -> `mask_emb`). Negative controls check that the comparison notices a
  swapped or permuted weight. HF's relative position index for the fixture grid, 14×14 and 3×5
  must equal `image.relative_position_index`.
- Converter tests: unknown, missing and mis-shaped keys, another model's checkpoint, per-layer
  bias tables and unsupported configs raise errors that name them; export round-trips exactly.
- Live tests (`@pytest.mark.torch`): fresh random HF models of other shapes and seeds, including
  HF's default `layer_norm_eps=1e-12` (that of the released checkpoints), no LayerScale, no mask
  token and one input channel. torch needs Python 3.11 and is not a dependency, so these tests run
  `fixtures/make_hf_image_fixture.py` under a torch interpreter in a subprocess and compare its
  arrays in-process (the interpreter: see `tests/hf_parity.py`; with none they skip):

      .venv/bin/python -m pytest tests/test_hf_image_parity.py -m torch

Not covered because our model is square-only: HF's bias for a non-square grid. There HF's
`Data2VecVisionRelativePositionBias.forward` reshapes the table as (2w−1, 2h−1) before resizing it
to (2h−1, 2w−1), which resamples it, so HF's bias is not `table[index]` (measured 3.1 max abs for
3×5 with an N(0, 1) table); its index, which we do compare, is fine.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.convert import hf_image
from d2v_jax.models import image
from tests import hf_parity
from tests.hf_parity import TOL, load_reference

FIXTURE = hf_parity.IMAGE_FIXTURE
FIXTURE_SCRIPT = hf_parity.FIXTURES / "make_hf_image_fixture.py"
LAYER = "encoder.layer.1"  # the layer the negative controls and error tests poke at


def reference_tensors(ref):
  """HF's tensors in our layout: patch positions only, CLS apart, under `out/` and `masked/`."""
  out = {}
  for run in ("out", "masked"):
    if f"{run}/last_hidden_state" not in ref:
      continue
    for k, v in ref.items():
      if k.startswith((f"{run}/hidden_states/", f"{run}/ffn/", f"{run}/last_hidden_state")):
        out[k] = v[:, 1:]
    out[f"{run}/cls"] = ref[f"{run}/last_hidden_state"][:, 0]
    out[f"{run}/pooler_output"] = ref[f"{run}/pooler_output"]
  return out


@functools.cache
def _forward(model):
  """Jitted forward of `model` returning our tensors under the reference's names."""

  @jax.jit
  def forward(params, images, mask):
    variables = {"params": params}
    tokens, padding = model.apply(variables, images, None, train=False, method="embed")
    x, aux = model.apply(variables, tokens, padding, mask, train=False, method="encode")
    if mask is not None:  # HF's hidden_states[0]: the encoder input, masked patches replaced
      tokens = jnp.where(mask[..., None], params["mask_emb"], tokens)
    out = {"hidden_states/0": tokens, "last_hidden_state": x, "cls": aux["cls"]}
    out["pooler_output"] = aux["cls"]  # use_mean_pooling=False: the pooler returns the CLS
    return {**out, **hf_parity.layer_outputs(aux)}

  return forward


def run_ours(model, params, ref):
  """Our outputs for the reference images (NCHW -> NHWC): plain run (`mask=None`, the teacher's
  path), plus the masked run if HF made one."""
  images = jnp.asarray(ref["input/pixel_values"].transpose(0, 2, 3, 1))
  forward = _forward(model)
  ours = {f"out/{k}": v for k, v in jax.device_get(forward(params, images, None)).items()}
  if "input/bool_masked_pos" in ref:
    masked = forward(params, images, jnp.asarray(ref["input/bool_masked_pos"]))
    ours.update({f"masked/{k}": v for k, v in jax.device_get(masked).items()})
  return ours


def max_abs_diffs(ours, ref):
  """{tensor name: max abs difference} over every tensor of `reference_tensors(ref)`."""
  return hf_parity.max_abs_diffs(ours, reference_tensors(ref))


def assert_parity(ours, ref):
  return hf_parity.assert_within_tol(max_abs_diffs(ours, ref))


def assert_index_matches_hf(ref):
  grids = [k for k in ref if k.startswith("rel_pos_index/")]
  assert grids
  for key in grids:
    h, w = (int(n) for n in key.removeprefix("rel_pos_index/").split("x"))
    ours = image.relative_position_index((h, w))
    np.testing.assert_array_equal(ours, ref[key], err_msg=key)
    assert ref[key].max() + 1 == image.num_relative_positions((h, w)), key


# ----------------------------------------------------------------------------- fixture tests


small = hf_parity.small_fixture(hf_image, FIXTURE)


def test_fixture_config_maps_every_size(small):
  cfg = small["model_cfg"]
  sizes = ("num_layers", "dim", "num_heads", "mlp_dim", "image_size", "patch_size")
  assert {k: cfg[k] for k in sizes} == dict(
    num_layers=3, dim=32, num_heads=4, mlp_dim=64, image_size=32, patch_size=8
  )
  assert (cfg.dropout, cfg.attention_dropout, cfg.drop_path_rate) == (0, 0, 0)
  assert (cfg.layer_scale_init, cfg.layer_norm_eps, cfg.dtype) == (0.1, 1e-6, "float32")
  assert small["model"].encoder.grid == (4, 4)
  assert small["model"].encoder.layer_norm_eps == 1e-6


def test_fixture_exercises_masking_and_random_parameters(small):
  """Guards the fixture itself: the masked run exists and no parameter kept HF's constant init."""
  ref, sd = small["ref"], small["state_dict"]
  mask = ref["input/bool_masked_pos"]
  assert mask.shape == (2, 16) and mask.any(1).all() and (~mask).any(1).all()
  assert "masked/last_hidden_state" in ref
  for key in ("embeddings.mask_token", "embeddings.cls_token", f"{LAYER}.lambda_1"):
    assert np.std(sd[key]) > 0.1, key
  assert np.std(sd["encoder.relative_position_bias.relative_position_bias_table"]) > 0.5
  hf_parity.assert_versions_recorded(ref)


def test_fixture_parity(small):
  ours = run_ours(small["model"], small["params"], small["ref"])
  diffs = assert_parity(ours, small["ref"])
  # Per run: hidden_states 0..3, ffn 0..2, last_hidden_state, cls, pooler_output.
  assert len(diffs) == 2 * (4 + 3 + 3)


def test_relative_position_index_matches_hf(small):
  ref = small["ref"]
  assert {k for k in ref if k.startswith("rel_pos_index/")} == {
    "rel_pos_index/4x4",
    "rel_pos_index/14x14",
    "rel_pos_index/3x5",
  }
  assert_index_matches_hf(ref)
  assert image.num_relative_positions((14, 14)) == 732  # spec §1.1: ViT-B/16 at 224²
  assert ref["rel_pos_index/14x14"].max() == 731


def _perturb(state_dict, name):
  sd = dict(state_dict)
  attention = f"{LAYER}.attention.attention"
  if name == "swap_q_k":
    hf_parity.swap(sd, f"{attention}.query.weight", f"{attention}.key.weight")
  elif name == "permute_heads_v":  # a head-split mix-up: v's heads rotated, the output's not
    for p in ("weight", "bias"):
      sd[f"{attention}.value.{p}"] = np.roll(sd[f"{attention}.value.{p}"], 8, axis=0)
  elif name == "transpose_bias_offsets":  # (dy, dx) <-> (dx, dy): a row/column mix-up
    key = "encoder.relative_position_bias.relative_position_bias_table"
    table = sd[key].copy()
    offsets = table[:-3].reshape(7, 7, -1)
    table[:-3] = offsets.transpose(1, 0, 2).reshape(49, -1)
    sd[key] = table
  elif name == "transpose_patch_kernel":  # kernel rows and columns swapped
    key = "embeddings.patch_embeddings.projection.weight"
    sd[key] = sd[key].transpose(0, 1, 3, 2)
  elif name == "swap_lambdas":
    hf_parity.swap(sd, f"{LAYER}.lambda_1", f"{LAYER}.lambda_2")
  elif name == "zero_mask_token":  # changes the masked run only
    sd["embeddings.mask_token"] = np.zeros_like(sd["embeddings.mask_token"])
  return sd


@pytest.mark.parametrize(
  "perturbation",
  [
    "swap_q_k",
    "permute_heads_v",
    "transpose_bias_offsets",
    "transpose_patch_kernel",
    "swap_lambdas",
    "zero_mask_token",
  ],
)
def test_fixture_detects_wrong_weights(small, perturbation):
  """Negative control: a plausible conversion mistake must break parity by far more than TOL."""
  params = hf_image.params_from_hf(
    _perturb(small["state_dict"], perturbation), small["hf_config"], init_params=small["params"]
  )
  diffs = max_abs_diffs(run_ours(small["model"], params, small["ref"]), small["ref"])
  worst = max(diffs["out/last_hidden_state"], diffs["masked/last_hidden_state"])
  assert worst > 100 * TOL, f"{perturbation} changed the final output by only {worst:.3g}"


# ----------------------------------------------------------------------------- converter


ckpt = hf_parity.ckpt_fixture(FIXTURE)


def test_converter_layouts_without_init_params(ckpt):
  sd, _ = ckpt
  params = hf_image.params_from_hf(*ckpt)
  assert "final_proj" not in params
  np.testing.assert_array_equal(params["mask_emb"], sd["embeddings.mask_token"][0, 0])
  np.testing.assert_array_equal(params["encoder"]["cls_token"], sd["embeddings.cls_token"][0, 0])
  # Linear transposed, q split as [D, H, Dh], the output as [H, Dh, D], Conv2d as [p, p, C, D].
  layer = params["encoder"]["blocks"]["layer_01"]
  q = sd[f"{LAYER}.attention.attention.query.weight"]
  np.testing.assert_array_equal(layer["attention"]["query"]["kernel"][:, 1, :], q[8:16].T)
  assert "bias" not in layer["attention"]["key"]
  out = sd[f"{LAYER}.attention.output.dense.weight"]
  np.testing.assert_array_equal(layer["attention"]["out"]["kernel"][2], out[:, 16:24].T)
  kernel = sd["embeddings.patch_embeddings.projection.weight"]  # [D, C, p, p]
  np.testing.assert_array_equal(
    params["frontend"]["patch_embed"]["projection"]["kernel"][1, 5, 2], kernel[:, 2, 1, 5]
  )
  np.testing.assert_array_equal(layer["attention_scale"], sd[f"{LAYER}.lambda_1"])
  assert params["encoder"]["rel_pos_bias"]["table"].shape == (52, 4)


def test_converter_keeps_final_proj_from_init(small):
  """`build_from_hf` fills what HF lacks from our init, and checks every other leaf's shape."""
  model, cfg = small["model"], small["model_cfg"]
  init = hf_image.init_shapes_and_head(model, cfg, num_channels=3, seed=7)
  params = hf_image.params_from_hf(small["state_dict"], small["hf_config"], init_params=init)
  np.testing.assert_array_equal(params["final_proj"]["kernel"], init["final_proj"]["kernel"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  hf_parity.assert_rejects_extra_leaf(hf_image, small, init)


@pytest.mark.parametrize(
  "key, value, expected",
  [
    (f"{LAYER}.output.dense.bias", None, "missing keys"),
    ("embeddings.mask_token", None, "missing keys"),  # required: use_mask_token=True
    ("layernorm.weight", None, "missing keys"),  # the final LayerNorm (use_mean_pooling=False)
    ("encoder.extra.weight", np.zeros(3), "unknown keys"),
    (f"{LAYER}.attention.attention.key.bias", np.zeros(32), "unknown keys"),  # BEiT: no k bias
    (f"{LAYER}.attention.attention.key.weight", np.zeros((32, 16)), "mis-shaped keys"),
    ("encoder.relative_position_bias.relative_position_bias_table", np.zeros((732, 4)), "mis-sha"),
    ("embeddings.patch_embeddings.projection.weight", np.zeros((32, 1, 8, 8)), "mis-shaped keys"),
  ],
  ids=[
    "missing",
    "missing_mask_token",
    "missing_final_norm",
    "unknown",
    "key_bias",
    "misshaped",
    "table_of_another_grid",
    "other_channels",
  ],
)
def test_converter_names_offending_keys(ckpt, key, value, expected):
  hf_parity.assert_names_offending_key(hf_image, ckpt, key, value, expected)


def test_converter_reports_all_problems_at_once(ckpt):
  message = hf_parity.conversion_error(
    hf_image,
    ckpt,
    drop=["embeddings.patch_embeddings.projection.bias"],
    add={"embeddings.position_embeddings": np.zeros((1, 17, 32))},
  )
  assert "embeddings.patch_embeddings.projection.bias" in message
  assert "embeddings.position_embeddings" in message and "absolute position" in message


def test_converter_rejects_an_audio_checkpoint(ckpt):
  """Another model's checkpoint fails clearly, with its config or with ours."""
  audio_sd, audio_config = hf_parity.load_checkpoint(hf_parity.AUDIO_FIXTURE)
  with pytest.raises(hf_image.ConversionError, match="model_type is 'data2vec-audio'"):
    hf_image.params_from_hf(audio_sd, audio_config)
  with pytest.raises(hf_image.ConversionError, match="Data2VecAudio state dict") as err:
    hf_image.params_from_hf(audio_sd, ckpt[1])
  message = str(err.value)
  assert "unknown keys (" in message and "missing keys (" in message
  assert "masked_spec_embed" in message and "embeddings.cls_token" in message


def test_converter_stacks_per_layer_bias_tables(ckpt):
  """Fine-tuned checkpoints have one table per block: they stack into our [L, rows, H] table."""
  state_dict, config = dict(ckpt[0]), ckpt[1]
  shared = state_dict.pop("encoder.relative_position_bias.relative_position_bias_table")
  tables = [shared + i for i in range(3)]  # distinct per block
  for i in range(3):
    key = (
      f"encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"
    )
    state_dict[key] = tables[i]
  per_layer = {**config, "use_relative_position_bias": True, "use_shared_relative_position_bias": 0}
  assert hf_image.config_from_hf(per_layer).relative_bias == "per_layer"
  params = hf_image.params_from_hf(state_dict, per_layer)
  np.testing.assert_array_equal(params["encoder"]["rel_pos_bias"]["table"], np.stack(tables))
  back = hf_image.params_to_hf(params)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert hf_image.hf_config_from_params(params)["use_relative_position_bias"] is True
  # A config that claims a shared table does not get the per-layer ones past us.
  with pytest.raises(hf_image.ConversionError, match="use_relative_position_bias=True") as err:
    hf_image.params_from_hf(state_dict, config)
  assert "unknown keys (3)" in str(err.value) and "missing keys (1)" in str(err.value)


def test_converter_checks_a_stored_relative_position_index(ckpt):
  """Older HF checkpoints store the index buffer: ours must equal it; it is not a parameter."""
  state_dict = dict(ckpt[0])
  key = "encoder.relative_position_bias.relative_position_index"
  state_dict[key] = image.relative_position_index((4, 4)).astype(np.int64)
  params = hf_image.params_from_hf(state_dict, ckpt[1])
  assert "relative_position_index" not in str(jax.tree.structure(params))
  state_dict[key] = state_dict[key].T
  with pytest.raises(hf_image.ConversionError, match=f"{key}: differs"):
    hf_image.params_from_hf(state_dict, ckpt[1])


def test_converter_task_model_prefix(ckpt):
  """A `Data2VecVisionForImageClassification` state dict: base keys under a prefix."""
  state_dict = {hf_image.TASK_MODEL_PREFIX + k: v for k, v in ckpt[0].items()}
  with pytest.raises(hf_image.ConversionError, match="pass prefix='data2vec_vision.'"):
    hf_image.params_from_hf(state_dict, ckpt[1])
  params = hf_image.params_from_hf(state_dict, ckpt[1], prefix=hf_image.TASK_MODEL_PREFIX)
  assert "mask_emb" in params
  state_dict["classifier.weight"] = np.zeros((10, 32))  # the head is reported, not dropped
  with pytest.raises(hf_image.ConversionError, match="classifier.weight") as err:
    hf_image.params_from_hf(state_dict, ckpt[1], prefix=hf_image.TASK_MODEL_PREFIX)
  assert "task heads" in str(err.value)


def test_converter_without_mask_token_or_layer_scale(ckpt):
  state_dict, config = dict(ckpt[0]), ckpt[1]
  del state_dict["embeddings.mask_token"]
  params = hf_image.params_from_hf(state_dict, {**config, "use_mask_token": False})
  assert "mask_emb" not in params
  for i in range(3):
    del state_dict[f"encoder.layer.{i}.lambda_1"], state_dict[f"encoder.layer.{i}.lambda_2"]
  no_scale = {**config, "use_mask_token": False, "layer_scale_init_value": 0.0}
  params = hf_image.params_from_hf(state_dict, no_scale)
  assert "attention_scale" not in params["encoder"]["blocks"]["layer_00"]
  assert hf_image.config_from_hf(no_scale).layer_scale_init == 0.0


def test_build_from_hf_applies_layer_norm_eps(ckpt):
  """HF's default eps (1e-12, the released checkpoints') reaches every LayerNorm of ours."""
  model, cfg, params = hf_image.build_from_hf(ckpt[0], {**ckpt[1], "layer_norm_eps": 1e-12})
  assert cfg.layer_norm_eps == 1e-12 and model.encoder.layer_norm_eps == 1e-12
  assert "final_proj" in params and "mask_emb" in params


@pytest.mark.parametrize(
  "override, expected",
  [
    (dict(use_relative_position_bias=True), "exactly one of"),  # both layouts at once
    (dict(use_shared_relative_position_bias=False), "exactly one of"),  # neither
    (dict(use_absolute_position_embeddings=True), "use_absolute_position_embeddings"),
    (dict(use_mean_pooling=True), "use_mean_pooling"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
    (dict(image_size=[32, 48]), "not square"),
    (dict(patch_size=[8, 4]), "not square"),
    (dict(image_size=36), "not a multiple"),
    (dict(num_attention_heads=5), "not divisible"),
    (dict(model_type="beit"), "model_type"),
  ],
)
def test_config_rejects_unsupported_options(ckpt, override, expected):
  with pytest.raises(hf_image.ConversionError, match=expected):
    hf_image.config_from_hf({**ckpt[1], **override})


def test_config_accepts_square_pairs(ckpt):
  cfg = hf_image.config_from_hf({**ckpt[1], "image_size": [32, 32], "patch_size": (8, 8)})
  assert (cfg.image_size, cfg.patch_size) == (32, 8)


def test_export_round_trip(small):
  """params_to_hf inverts params_from_hf exactly; `final_proj` has no HF counterpart."""
  fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  fields += ("image_size", "patch_size", "num_channels", "use_mask_token", "use_mean_pooling")
  hf_parity.assert_export_round_trip(hf_image, small, fields)


# ----------------------------------------------------------------------------- live HF models


LIVE_CONFIGS = {
  # HF defaults where the released checkpoints keep them: layer_norm_eps 1e-12 and no mask token;
  # plus no LayerScale (no lambda_1/lambda_2), one channel, a 3×3 grid of 16² patches, 6 heads.
  "eps_1e12_no_layer_scale": dict(
    image_size=48,
    patch_size=16,
    num_channels=1,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=6,
    intermediate_size=96,
    layer_scale_init_value=0.0,
  ),
  # The 14×14 grid of ViT-B/16 at 224² (the 732-row table), narrow and shallow; 8 heads, mask
  # token, the original eps.
  "grid_14x14": dict(
    image_size=224,
    patch_size=16,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=8,
    intermediate_size=128,
    layer_norm_eps=1e-6,
    use_mask_token=True,
  ),
}
# The released base shape (12 × 768, 12 heads, FFN 3072, 224² in 16² patches): ~27 s on 2 cores,
# half of it the torch subprocess building and writing ~375 MB of random weights.
BASE_CONFIG = dict(use_mask_token=True)


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
  """Every model of LIVE_CONFIGS from one torch subprocess (torch imports once)."""
  out = tmp_path_factory.mktemp("hf_image_live")
  args = ["--out", str(out), "--configs", json.dumps(LIVE_CONFIGS), "--batch", "3"]
  hf_parity.run_fixture_script(FIXTURE_SCRIPT, args)
  return out


def check_live(path):
  state_dict, hf_config, ref = load_reference(path)
  assert_index_matches_hf(ref)
  model, _, params = hf_image.build_from_hf(state_dict, hf_config)
  assert model.encoder.layer_norm_eps == hf_config["layer_norm_eps"]
  assert ("masked/last_hidden_state" in ref) == hf_config["use_mask_token"]
  return assert_parity(run_ours(model, params, ref), ref)


@pytest.mark.torch
@pytest.mark.parametrize("name", list(LIVE_CONFIGS))
def test_live_hf_parity(name, live_dir):
  check_live(live_dir / f"{name}.npz")


@pytest.mark.torch
@pytest.mark.slow
def test_live_hf_parity_base(tmp_path):
  out = tmp_path / "base.npz"
  args = ["--out", str(out), "--config", json.dumps(BASE_CONFIG), "--batch", "1"]
  hf_parity.run_fixture_script(FIXTURE_SCRIPT, args)
  check_live(out)
