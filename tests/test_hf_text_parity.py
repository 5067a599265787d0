"""Layer-by-layer parity of our text model with HF `Data2VecTextModel` (spec §1.1 text, §4).

Three kinds of test:
- Fixture tests (always run, no torch): `fixtures/hf_text_small.npz` holds a random HF model's
  state dict (the released layout: RoBERTa positions from pad + 1, one token type, eps 1e-5, a
  pooler; every parameter re-drawn so none is 0, 1 or constant, the token type row included),
  token ids with padding at the end of some rows and at the start of one, and activations. We
  convert the weights with `d2v_jax.convert.hf_text`, run our model in fp32 and compare, at the
  non-pad positions, the embeddings output (HF `hidden_states[0]`), every block's output
  (`hidden_states[1..L]`), every FFN output before the residual (`output.dense`, the v1 text
  targets) and `last_hidden_state`. Our position ids must equal HF's
  `create_position_ids_from_input_ids`. Negative controls check that the comparison notices a
  swapped, permuted or shifted weight and a dropped token type row.
- Converter tests: unknown, missing and mis-shaped keys, task-model, fairseq and other modalities'
  checkpoints, token types and unsupported configs raise errors that name them; the pooler is
  ignored; export round-trips exactly.
- Live tests (`@pytest.mark.torch`): fresh random HF models of other shapes and seeds (a
  `RobertaModel` with rows that fill every position, pad id 0, HF's default eps 1e-12), and HF
  running our exported weights. torch needs Python 3.11 and is not a dependency, so these tests
  run `fixtures/make_hf_text_fixture.py` under a torch interpreter in a subprocess and compare its
  arrays in-process (the interpreter: see `tests/hf_parity.py`; with none they skip):

      .venv/bin/python -m pytest tests/test_hf_text_parity.py -m torch
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.convert import hf_text
from d2v_jax.models import data2vec, text
from tests import hf_parity
from tests.hf_parity import TOL, load_reference

FIXTURE = hf_parity.TEXT_FIXTURE
FIXTURE_SCRIPT = hf_parity.FIXTURES / "make_hf_text_fixture.py"
LAYER = "encoder.layer.1"  # the layer the negative controls and error tests poke at


def valid_positions(ref):
  """bool[B, L]: the non-pad tokens, where HF and we are compared."""
  return ref["input/attention_mask"].astype(bool)


def reference_tensors(ref):
  """HF's tensors at the non-pad positions ([N, D] each)."""
  valid = valid_positions(ref)
  names = ("out/hidden_states/", "out/ffn/", "out/last_hidden_state")
  return {k: v[valid] for k, v in ref.items() if k.startswith(names)}


@functools.cache
def _forward(model):
  """Jitted forward of `model` returning our tensors under the reference's names."""

  @jax.jit
  def forward(params, input_ids, padding_mask):
    variables = {"params": params}
    tokens, padding = model.apply(variables, input_ids, padding_mask, train=False, method="embed")
    x, aux = model.apply(variables, tokens, padding, train=False, method="encode")
    out = {"hidden_states/0": tokens, "last_hidden_state": x}
    return {**out, **hf_parity.layer_outputs(aux)}

  return forward


def run_ours(model, params, ref):
  """Our outputs for the reference ids at the non-pad positions (padding mask = ids == pad)."""
  input_ids = jnp.asarray(ref["input/input_ids"])
  padding_mask = input_ids == model.frontend.pad_id
  np.testing.assert_array_equal(~np.asarray(padding_mask), valid_positions(ref))
  out = jax.device_get(_forward(model)(params, input_ids, padding_mask))
  valid = valid_positions(ref)
  return {f"out/{k}": v[valid] for k, v in out.items()}


def max_abs_diffs(ours, ref):
  """{tensor name: max abs difference} over every tensor of `reference_tensors(ref)`."""
  return hf_parity.max_abs_diffs(ours, reference_tensors(ref))


def assert_parity(ours, ref):
  return hf_parity.assert_within_tol(max_abs_diffs(ours, ref))


def assert_positions_match_hf(ref, pad_id):
  """Our position ids (from the padding mask) equal HF's (from the ids), at every position."""
  ids = ref["input/input_ids"]
  ours = np.asarray(text.position_ids(jnp.asarray(ids == pad_id), pad_id))
  np.testing.assert_array_equal(ours, ref["input/position_ids"])


# ----------------------------------------------------------------------------- fixture tests


small = hf_parity.small_fixture(hf_text, FIXTURE)


def test_fixture_config_maps_every_size(small):
  cfg = small["model_cfg"]
  sizes = ("num_layers", "dim", "num_heads", "mlp_dim", "vocab_size", "max_positions")
  assert {k: cfg[k] for k in sizes} == dict(
    num_layers=3, dim=32, num_heads=4, mlp_dim=64, vocab_size=100, max_positions=64
  )
  assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0, 0, 0)
  assert (cfg.pad_id, cfg.layer_norm_eps, cfg.dtype) == (1, 1e-5, "float32")
  model = small["model"]
  assert (model.frontend.pad_id, model.frontend.max_positions) == (1, 64)
  assert model.frontend.layer_norm_eps == model.encoder.layer_norm_eps == 1e-5
  assert small["params"]["frontend"]["position_embed"]["embedding"].shape == (66, 32)


def test_fixture_exercises_padding_and_random_parameters(small):
  """Guards the fixture itself: padded rows (end and start), and no constant HF init left."""
  ref, sd = small["ref"], small["state_dict"]
  valid = valid_positions(ref)
  assert valid[0].all() and not valid[1:].all(1).any()  # row 0 full, the others padded
  assert not valid[3, 0] and valid[3, -1]  # row 3 padded at the start
  ids = ref["input/input_ids"]
  assert (ids[valid] != 1).all() and (ids[~valid] == 1).all()
  # The token type row (folded into the positions) and the pad rows are not zero.
  assert np.std(sd[hf_text.TOKEN_TYPE_KEY]) > 0.5
  assert np.std(sd[hf_text.POSITION_KEY][1]) > 0.5
  assert np.std(sd[f"{LAYER}.output.LayerNorm.bias"]) > 0.1
  assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(sd)
  hf_parity.assert_versions_recorded(ref)


def test_position_ids_match_hf(small):
  ref = small["ref"]
  assert_positions_match_hf(ref, pad_id=1)
  # RoBERTa: the i-th non-pad token (1-based) is at pad + i, pads at pad; 24 tokens use 2..25.
  positions = ref["input/position_ids"]
  assert positions[0].tolist() == list(range(2, 26))
  assert (positions[~valid_positions(ref)] == 1).all()


def test_fixture_parity(small):
  ours = run_ours(small["model"], small["params"], small["ref"])
  diffs = assert_parity(ours, small["ref"])
  # hidden_states 0..3, ffn 0..2, last_hidden_state.
  assert len(diffs) == 4 + 3 + 1


def _perturb(state_dict, name):
  sd = dict(state_dict)
  attention = f"{LAYER}.attention.self"
  if name == "swap_q_k":
    hf_parity.swap(sd, f"{attention}.query.weight", f"{attention}.key.weight")
  elif name == "permute_heads_v":  # a head-split mix-up: v's heads rotated, the output's not
    for p in ("weight", "bias"):
      sd[f"{attention}.value.{p}"] = np.roll(sd[f"{attention}.value.{p}"], 8, axis=0)
  elif name == "shift_positions":  # positions off by one (e.g. counted from pad, not pad + 1)
    sd[hf_text.POSITION_KEY] = np.roll(sd[hf_text.POSITION_KEY], -1, axis=0)
  elif name == "drop_token_type":  # the token type row not folded in
    sd[hf_text.TOKEN_TYPE_KEY] = np.zeros_like(sd[hf_text.TOKEN_TYPE_KEY])
  elif name == "swap_layer_norms":  # attention.output.LayerNorm <-> output.LayerNorm
    for p in ("weight", "bias"):
      hf_parity.swap(sd, f"{LAYER}.attention.output.LayerNorm.{p}", f"{LAYER}.output.LayerNorm.{p}")
  return sd


@pytest.mark.parametrize(
  "perturbation",
  ["swap_q_k", "permute_heads_v", "shift_positions", "drop_token_type", "swap_layer_norms"],
)
def test_fixture_detects_wrong_weights(small, perturbation):
  """Negative control: a plausible conversion mistake must break parity by far more than TOL."""
  params = hf_text.params_from_hf(
    _perturb(small["state_dict"], perturbation), small["hf_config"], init_params=small["params"]
  )
  diffs = max_abs_diffs(run_ours(small["model"], params, small["ref"]), small["ref"])
  worst = diffs["out/last_hidden_state"]
  assert worst > 100 * TOL, f"{perturbation} changed the final output by only {worst:.3g}"


# ----------------------------------------------------------------------------- converter


ckpt = hf_parity.ckpt_fixture(FIXTURE)


def test_converter_layouts_without_init_params(ckpt):
  sd, _ = ckpt
  params = hf_text.params_from_hf(*ckpt)
  assert "final_proj" not in params and "mask_emb" not in params
  frontend = params["frontend"]
  np.testing.assert_array_equal(
    frontend["token_embed"]["embedding"], sd["embeddings.word_embeddings.weight"]
  )
  # Token type 0 folded into every position row.
  np.testing.assert_array_equal(
    frontend["position_embed"]["embedding"],
    sd[hf_text.POSITION_KEY] + sd[hf_text.TOKEN_TYPE_KEY][0],
  )
  np.testing.assert_array_equal(frontend["embed_norm"]["scale"], sd["embeddings.LayerNorm.weight"])
  # Linear transposed, q split as [D, H, Dh], the output as [H, Dh, D].
  layer = params["encoder"]["blocks"]["layer_01"]
  q = sd[f"{LAYER}.attention.self.query.weight"]
  np.testing.assert_array_equal(layer["attention"]["query"]["kernel"][:, 1, :], q[8:16].T)
  np.testing.assert_array_equal(
    layer["attention"]["key"]["bias"][2], sd[f"{LAYER}.attention.self.key.bias"][16:24]
  )
  out = sd[f"{LAYER}.attention.output.dense.weight"]
  np.testing.assert_array_equal(layer["attention"]["out"]["kernel"][2], out[:, 16:24].T)
  np.testing.assert_array_equal(layer["fc1"]["kernel"], sd[f"{LAYER}.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(layer["ffn_norm"]["bias"], sd[f"{LAYER}.output.LayerNorm.bias"])
  np.testing.assert_array_equal(
    layer["attention_norm"]["bias"], sd[f"{LAYER}.attention.output.LayerNorm.bias"]
  )
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))


def test_converter_keeps_final_proj_from_init(small):
  """`build_from_hf` fills what HF lacks from our init, and checks every other leaf's shape."""
  init = hf_text.init_shapes_and_head(small["model"], seed=7)
  params = hf_text.params_from_hf(small["state_dict"], small["hf_config"], init_params=init)
  head = params["final_proj"]
  assert set(head) == {"dense", "out"} and head["dense"]["kernel"].shape == (32, 64)
  np.testing.assert_array_equal(head["out"]["kernel"], init["final_proj"]["out"]["kernel"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  hf_parity.assert_rejects_extra_leaf(hf_text, small, init)


@pytest.mark.parametrize(
  "key, value, expected",
  [
    (f"{LAYER}.output.dense.bias", None, "missing keys"),
    (hf_text.TOKEN_TYPE_KEY, None, "missing keys"),  # required: it is folded into the positions
    ("embeddings.LayerNorm.weight", None, "missing keys"),
    ("encoder.extra.weight", np.zeros(3), "unknown keys"),
    (f"{LAYER}.attention.self.key.weight", np.zeros((32, 16)), "mis-shaped keys"),
    (hf_text.POSITION_KEY, np.zeros((514, 32)), "mis-shaped keys"),
    ("embeddings.word_embeddings.weight", np.zeros((50265, 32)), "mis-shaped keys"),
    (hf_text.TOKEN_TYPE_KEY, np.zeros((2, 32)), "mis-shaped keys"),  # config: type_vocab_size 1
    ("pooler.dense.weight", np.zeros((32, 16)), "mis-shaped keys"),  # ignored, but shape-checked
  ],
  ids=[
    "missing",
    "missing_token_type",
    "missing_embed_norm",
    "unknown",
    "misshaped",
    "positions_of_another_model",
    "another_vocabulary",
    "token_types_not_in_config",
    "pooler",
  ],
)
def test_converter_names_offending_keys(ckpt, key, value, expected):
  hf_parity.assert_names_offending_key(hf_text, ckpt, key, value, expected)


def test_converter_reports_all_problems_at_once(ckpt):
  add = {
    "embeddings.distance_embedding.weight": np.zeros((131, 8)),
    f"{LAYER}.crossattention.self.query.weight": np.zeros((32, 32)),
  }
  message = hf_parity.conversion_error(
    hf_text, ckpt, drop=[f"{LAYER}.intermediate.dense.bias"], add=add
  )
  assert f"{LAYER}.intermediate.dense.bias" in message and "missing keys (1)" in message
  assert "embeddings.distance_embedding.weight" in message and "relative position" in message
  assert "unknown keys (2)" in message and "cross-attention" in message


def test_converter_ignores_the_pooler(ckpt):
  """HF's pooler is never pretrained (fairseq has none): accepted with or without, not converted."""
  with_pooler = hf_text.params_from_hf(*ckpt)
  state_dict = {k: v for k, v in ckpt[0].items() if not k.startswith("pooler.")}
  assert len(state_dict) == len(ckpt[0]) - 2
  without = hf_text.params_from_hf(state_dict, ckpt[1])
  jax.tree.map(np.testing.assert_array_equal, with_pooler, without)
  assert "pooler" not in str(jax.tree.structure(without))


def test_converter_token_types(ckpt):
  """More token types convert only if they all equal type 0 (our model has no token types)."""
  state_dict, config = dict(ckpt[0]), {**ckpt[1], "type_vocab_size": 3}
  row = state_dict[hf_text.TOKEN_TYPE_KEY]
  state_dict[hf_text.TOKEN_TYPE_KEY] = np.repeat(row, 3, axis=0)
  same = hf_text.params_from_hf(state_dict, config)
  jax.tree.map(np.testing.assert_array_equal, same, hf_text.params_from_hf(*ckpt))
  state_dict[hf_text.TOKEN_TYPE_KEY] = np.concatenate([row, row, row + 1])
  with pytest.raises(hf_text.ConversionError, match="3 token types with different rows") as err:
    hf_text.params_from_hf(state_dict, config)
  assert "token_type_ids = 0" in str(err.value)


def test_converter_checks_a_stored_position_ids_buffer(ckpt):
  """Older HF checkpoints store `embeddings.position_ids`: arange is accepted, not converted."""
  state_dict = dict(ckpt[0])
  key = "embeddings.position_ids"
  state_dict[key] = np.arange(66, dtype=np.int64)[None]
  params = hf_text.params_from_hf(state_dict, ckpt[1])
  assert "position_ids" not in str(jax.tree.structure(params))
  state_dict[key] = state_dict[key][:, ::-1]
  with pytest.raises(hf_text.ConversionError, match=f"{key}: not arange"):
    hf_text.params_from_hf(state_dict, ckpt[1])


def test_converter_task_model_prefix(ckpt):
  """A `Data2VecTextForMaskedLM` state dict (the released checkpoints): base keys under a prefix,
  plus the MLM head, which must be dropped."""
  state_dict = {hf_text.TASK_MODEL_PREFIX + k: v for k, v in ckpt[0].items()}
  with pytest.raises(hf_text.ConversionError, match="pass prefix='data2vec_text.'"):
    hf_text.params_from_hf(state_dict, ckpt[1])
  params = hf_text.params_from_hf(state_dict, ckpt[1], prefix=hf_text.TASK_MODEL_PREFIX)
  jax.tree.map(np.testing.assert_array_equal, params, hf_text.params_from_hf(*ckpt))
  state_dict["lm_head.decoder.weight"] = np.zeros((100, 32))
  state_dict["lm_head.bias"] = np.zeros(100)
  with pytest.raises(hf_text.ConversionError, match="lm_head.decoder.weight") as err:
    hf_text.params_from_hf(state_dict, ckpt[1], prefix=hf_text.TASK_MODEL_PREFIX)
  message = str(err.value)
  assert "MLM head of Data2VecTextForMaskedLM" in message and "task heads" in message
  # RoBERTa task models: the same under `roberta.`.
  roberta = {hf_text.ROBERTA_PREFIX + k: v for k, v in ckpt[0].items()}
  with pytest.raises(hf_text.ConversionError, match="pass prefix='roberta.'"):
    hf_text.params_from_hf(roberta, ckpt[1])
  hf_text.params_from_hf(roberta, {**ckpt[1], "model_type": "roberta"}, prefix="roberta.")


def test_converter_rejects_a_fairseq_checkpoint(ckpt):
  """fairseq data2vec text names: the error points at a separate (fairseq) converter."""
  state_dict = {
    "encoder.sentence_encoder.embed_tokens.weight": np.zeros((100, 32)),
    "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight": np.zeros((32, 32)),
    "encoder.regression_head.0.weight": np.zeros((64, 32)),
    "encoder.lm_head.weight": np.zeros((100, 32)),
  }
  with pytest.raises(hf_text.ConversionError, match="fairseq") as err:
    hf_text.params_from_hf(state_dict, ckpt[1])
  message = str(err.value)
  assert "separate converter" in message and "unknown keys (4)" in message
  assert "embeddings.word_embeddings.weight" in message  # and what is missing


def test_converter_rejects_other_modalities(ckpt):
  """Another model's checkpoint fails clearly, with its config or with ours."""
  for path, model_type, module, kind in (
    (hf_parity.AUDIO_FIXTURE, "data2vec-audio", "hf_audio", "Data2VecAudio"),
    (hf_parity.IMAGE_FIXTURE, "data2vec-vision", "hf_image", "Data2VecVision"),
  ):
    other_sd, other_config = hf_parity.load_checkpoint(path)
    with pytest.raises(hf_text.ConversionError, match=f"model_type is '{model_type}'") as err:
      hf_text.params_from_hf(other_sd, other_config)
    assert f"d2v_jax.convert.{module}" in str(err.value)
    with pytest.raises(hf_text.ConversionError, match=f"looks like a {kind} state dict") as err:
      hf_text.params_from_hf(other_sd, ckpt[1])
    message = str(err.value)
    assert "unknown keys (" in message and "missing keys (" in message
    assert "embeddings.word_embeddings.weight" in message


@pytest.mark.parametrize(
  "override, expected",
  [
    (dict(hidden_act="gelu_new"), "hidden_act"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(num_attention_heads=5), "not divisible"),
    (dict(pad_token_id=None), "pad_token_id is None"),
    (dict(pad_token_id=100), "outside the vocabulary"),
    (dict(max_position_embeddings=2), "leaves no position"),
    (dict(type_vocab_size=0), "type_vocab_size"),
    (dict(model_type="bert"), "model_type"),
  ],
)
def test_config_rejects_unsupported_options(ckpt, override, expected):
  with pytest.raises(hf_text.ConversionError, match=expected):
    hf_text.config_from_hf({**ckpt[1], **override})


def test_config_accepts_roberta_and_old_fields(ckpt):
  old = {**ckpt[1], "model_type": "roberta", "position_embedding_type": "absolute"}
  cfg = hf_text.config_from_hf({**old, "pad_token_id": 0, "max_position_embeddings": 514})
  assert (cfg.pad_id, cfg.max_positions) == (0, 513)
  # RoBERTa-base / data2vec-text-base sizes name the base variant.
  base = dict(
    num_hidden_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=50265,
    max_position_embeddings=514,
  )
  assert hf_text.config_from_hf({**ckpt[1], **base}).variant == "base"


def test_config_layer_norm_eps_follows_build_model(ckpt):
  """HF's default eps (1e-12) is carried over into the model that `build_model` builds."""
  cfg = hf_text.config_from_hf({**ckpt[1], "layer_norm_eps": 1e-12})
  model = data2vec.build_model("text", cfg)
  assert cfg.layer_norm_eps == model.frontend.layer_norm_eps == model.encoder.layer_norm_eps
  assert cfg.layer_norm_eps == 1e-12


def test_export_round_trip(small):
  """params_to_hf inverts params_from_hf exactly; no pooler, a zero token type row."""
  sd, hf_config, params = small["state_dict"], small["hf_config"], small["params"]
  exported = hf_text.params_to_hf(params)
  assert set(exported) == set(sd) - {"pooler.dense.weight", "pooler.dense.bias"}
  for k, v in exported.items():
    assert v.dtype == np.float32, k
    if k not in (hf_text.POSITION_KEY, hf_text.TOKEN_TYPE_KEY):
      np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # HF adds positions and token type 0 to every token: the same sum as the original's.
  np.testing.assert_array_equal(exported[hf_text.TOKEN_TYPE_KEY], np.zeros((1, 32)))
  np.testing.assert_array_equal(
    exported[hf_text.POSITION_KEY] + exported[hf_text.TOKEN_TYPE_KEY][0],
    sd[hf_text.POSITION_KEY] + sd[hf_text.TOKEN_TYPE_KEY][0],
  )
  config = hf_text.hf_config_from_params(params)
  fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  fields += ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id")
  fields += ("layer_norm_eps", "hidden_act", "bos_token_id", "eos_token_id")
  assert {k: config[k] for k in fields} == {k: hf_config[k] for k in fields}
  again = hf_text.params_from_hf(exported, config, init_params=params)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))
  hf_parity.assert_export_prefix_and_extra(hf_text, params)
  assert hf_text.hf_config_from_params(params, pad_id=0)["pad_token_id"] == 0
  with pytest.raises(hf_text.ConversionError, match="no position after pad_id 65"):
    hf_text.hf_config_from_params(params, pad_id=65)


# ----------------------------------------------------------------------------- live HF models


LIVE_CONFIGS = {
  # A RobertaModel (same layout, model_type "roberta") without pooler; 32 positions and rows of
  # 32 tokens, so the full row uses the last position row; 6 heads, 2 layers.
  "roberta_all_positions": dict(
    _class="roberta",
    _pooler=False,
    vocab_size=300,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=6,
    intermediate_size=96,
    max_position_embeddings=32 + 2,
  ),
  # pad id 0 (positions from 1, one reserved row), bos 2, eos 3; 4 layers, 8 heads.
  "pad_0": dict(
    vocab_size=50,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    intermediate_size=128,
    max_position_embeddings=40 + 1,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
  ),
  # HF's default eps (1e-12), not the checkpoints'.
  "eps_1e12": dict(
    vocab_size=80,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=34,
    layer_norm_eps=1e-12,
  ),
}
LIVE_LENGTH = 32  # capped per model at its number of positions
# The released base shape (RoBERTa-base: 50265 tokens, 514 positions, 12 × 768, 12 heads, FFN
# 3072) with a full row of 512 tokens; a ~500 MB random state dict.
BASE_CONFIG = dict(
  vocab_size=50265,
  max_position_embeddings=514,
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
)


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
  """Every model of LIVE_CONFIGS from one torch subprocess (torch imports once)."""
  out = tmp_path_factory.mktemp("hf_text_live")
  configs = json.dumps(LIVE_CONFIGS)
  hf_parity.run_fixture_script(
    FIXTURE_SCRIPT, ["--out", str(out), "--configs", configs, "--length", str(LIVE_LENGTH)]
  )
  return out


def check_live(path):
  state_dict, hf_config, ref = load_reference(path)
  assert_positions_match_hf(ref, hf_config["pad_token_id"])
  model, _, params = hf_text.build_from_hf(state_dict, hf_config)
  assert model.encoder.layer_norm_eps == hf_config["layer_norm_eps"]
  return assert_parity(run_ours(model, params, ref), ref)


@pytest.mark.torch
@pytest.mark.parametrize("name", list(LIVE_CONFIGS))
def test_live_hf_parity(name, live_dir):
  state_dict, hf_config, ref = load_reference(live_dir / f"{name}.npz")
  if name == "roberta_all_positions":
    assert hf_config["model_type"] == "roberta" and "pooler.dense.weight" not in state_dict
    assert valid_positions(ref)[0].sum() == 32  # the full row reaches the last position
  check_live(live_dir / f"{name}.npz")


@pytest.mark.torch
def test_live_hf_runs_our_export(small, tmp_path):
  """HF loads our exported state dict and config (strict) and computes our model's outputs."""
  weights = tmp_path / "weights.npz"
  exported = hf_text.params_to_hf(small["params"])
  np.savez(weights, **{f"param/{k}": v for k, v in exported.items()})
  out = tmp_path / "export.npz"
  config = json.dumps(hf_text.hf_config_from_params(small["params"]))
  hf_parity.run_fixture_script(
    FIXTURE_SCRIPT, ["--out", str(out), "--config", config, "--weights", str(weights)]
  )
  _, hf_config, ref = load_reference(out)
  assert hf_config["type_vocab_size"] == 1
  assert_parity(run_ours(small["model"], small["params"], ref), ref)


@pytest.mark.torch
@pytest.mark.slow
def test_live_hf_parity_base(tmp_path):
  out = tmp_path / "base.npz"
  args = ["--out", str(out), "--config", json.dumps(BASE_CONFIG), "--batch", "2"]
  hf_parity.run_fixture_script(FIXTURE_SCRIPT, [*args, "--length", "512"])
  check_live(out)
