"""fairseq / BEiT data2vec v1 checkpoints -> HF names (`d2v_jax.convert.fairseq_v1`).

fairseq cannot run here, so the state dicts are synthetic: the exact key names and shapes of the
released checkpoints (read from fairseq's `data2vec_audio.py`, `data2vec_text.py`, `wav2vec2.py`,
`wav2vec2_asr.py`, `ema_module.py` and data2vec_vision's `modeling_cyclical.py` /
`modeling_finetune.py`), filled with distinct random values at small sizes. Each fixture states,
key by key, the HF name it must land under (spec §4's table) or that it must be dropped; the tests
check every tensor's value there, then hand the result to the HF converter and check every leaf of
our tree. Base- and large-shaped dicts (zero-stride views: no memory) check names and shapes
against the HF converters' key tables.
"""

import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from d2v_jax.convert import common, fairseq_v1, hf_audio, hf_image, hf_text
from d2v_jax.models import image

KERNELS = (10, 3, 3, 3, 3, 2, 2)
STRIDES = (5, 2, 2, 2, 2, 2, 2)
CONV_LAYERS = "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] + [(16, 2, 2)]"

# Small sizes: every name layout of base/large, at a fraction of the size.
DIM, HEADS, MLP, LAYERS = 32, 4, 64, 2


@dataclasses.dataclass
class Fixture:
  """A synthetic fairseq state dict and where each key must end up."""

  lazy: bool = False  # zero-stride zero views (shapes only) instead of random values
  seed: int = 0
  state: dict = dataclasses.field(default_factory=dict)  # fairseq name -> array
  expected: dict = dataclasses.field(default_factory=dict)  # fairseq name -> HF name(s)
  dropped: set = dataclasses.field(default_factory=set)  # fairseq names that must be dropped
  ema: dict = dataclasses.field(default_factory=dict)  # EMA name -> array
  teacher: dict = dataclasses.field(default_factory=dict)  # EMA name -> HF name

  def __post_init__(self):
    self.rng = np.random.default_rng(self.seed)

  def array(self, shape):
    if self.lazy:
      return np.broadcast_to(np.float32(0), shape)
    return self.rng.standard_normal(shape).astype(np.float32)

  def add(self, name, hf_name, *shape):
    """A key that lands under `hf_name` (a tuple of 3 for a fused q/k/v; None: dropped)."""
    self.state[name] = self.array(shape)
    if hf_name is None:
      self.dropped.add(name)
    else:
      self.expected[name] = hf_name

  def add_ema(self, name, hf_name, *shape):
    self.ema[name] = self.array(shape)
    if hf_name is not None:
      self.teacher[name] = hf_name


# ----------------------------------------------------------------------------- fixtures


def fairseq_audio(
  *,
  dim=DIM,
  layers=LAYERS,
  mlp=MLP,
  conv_dim=16,
  pos_layers=5,
  pos_kernel=19,
  groups=16,
  ctc_vocab=None,
  ema=True,
  lazy=False,
):
  """`data2vec_audio` (pretraining, `final_proj.0.*`, `_ema` of the encoder) or `Wav2VecCtc`."""
  f = Fixture(lazy=lazy, seed=1)
  fs = "w2v_encoder.w2v_model." if ctc_vocab else ""
  for j, k in enumerate(KERNELS):
    conv, hf = f"{fs}feature_extractor.conv_layers.{j}", f"feature_extractor.conv_layers.{j}"
    f.add(f"{conv}.0.weight", f"{hf}.conv.weight", conv_dim, 1 if j == 0 else conv_dim, k)
    for p in ("weight", "bias"):
      f.add(f"{conv}.2.1.{p}", f"{hf}.layer_norm.{p}", conv_dim)
  for p in ("weight", "bias"):
    f.add(f"{fs}layer_norm.{p}", f"feature_projection.layer_norm.{p}", conv_dim)
  f.add(f"{fs}post_extract_proj.weight", "feature_projection.projection.weight", dim, conv_dim)
  f.add(f"{fs}post_extract_proj.bias", "feature_projection.projection.bias", dim)
  f.add(f"{fs}mask_emb", "masked_spec_embed", dim)

  def encoder(add, fs):
    for j in range(pos_layers):
      hf = f"encoder.pos_conv_embed.layers.{j}.conv"
      add(f"{fs}encoder.pos_conv.{j}.0.weight", f"{hf}.weight", dim, dim // groups, pos_kernel)
      add(f"{fs}encoder.pos_conv.{j}.0.bias", f"{hf}.bias", dim)
    for i in range(layers):
      layer, hf = f"{fs}encoder.layers.{i}", f"encoder.layers.{i}"
      for proj in ("q", "k", "v", "out"):
        add(f"{layer}.self_attn.{proj}_proj.weight", f"{hf}.attention.{proj}_proj.weight", dim, dim)
        add(f"{layer}.self_attn.{proj}_proj.bias", f"{hf}.attention.{proj}_proj.bias", dim)
      add(f"{layer}.fc1.weight", f"{hf}.feed_forward.intermediate_dense.weight", mlp, dim)
      add(f"{layer}.fc1.bias", f"{hf}.feed_forward.intermediate_dense.bias", mlp)
      add(f"{layer}.fc2.weight", f"{hf}.feed_forward.output_dense.weight", dim, mlp)
      add(f"{layer}.fc2.bias", f"{hf}.feed_forward.output_dense.bias", dim)
      for p in ("weight", "bias"):
        add(f"{layer}.self_attn_layer_norm.{p}", f"{hf}.layer_norm.{p}", dim)
        add(f"{layer}.final_layer_norm.{p}", f"{hf}.final_layer_norm.{p}", dim)
    for p in ("weight", "bias"):
      add(f"{fs}encoder.layer_norm.{p}", f"encoder.layer_norm.{p}", dim)

  encoder(f.add, fs)
  if ctc_vocab:
    f.add("w2v_encoder.proj.weight", "lm_head.weight", ctc_vocab, dim)
    f.add("w2v_encoder.proj.bias", "lm_head.bias", ctc_vocab)
  else:
    f.add("final_proj.0.weight", None, dim, dim)  # the released files' Sequential name
    f.add("final_proj.0.bias", None, dim)
  if ema and not ctc_vocab:
    # `ema_transformer_only`: the EMA copies `self.encoder`, so its names drop "encoder.".
    encoder(lambda name, hf, *shape: f.add_ema(name.removeprefix("encoder."), hf, *shape), "")
  return f


def audio_cfg(**fine_tuning):
  """`ckpt["cfg"]["model"]`: the pretraining config, or a CTC config with it as `w2v_args`."""
  pretraining = dict(
    _name="data2vec_audio",
    encoder_embed_dim=DIM,
    encoder_attention_heads=HEADS,
    conv_feature_layers=CONV_LAYERS,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    encoder_layerdrop=0.05,
    dropout_input=0.0,
    mask_prob=0.65,
  )
  if not fine_tuning:
    return pretraining
  return dict(_name="wav2vec_ctc", w2v_args=dict(task={}, model=pretraining), **fine_tuning)


def fairseq_text(*, vocab=50, positions=10, dim=DIM, layers=LAYERS, mlp=MLP, head=None, lazy=False):
  """`data2vec_text`: sentence encoder, 2-layer regression head, `encoder._ema`; with `head`, a
  GLUE-style `classification_heads.<head>` (num_classes 3)."""
  f = Fixture(lazy=lazy, seed=2)

  def encoder(add, fs):
    add(f"{fs}embed_tokens.weight", "embeddings.word_embeddings.weight", vocab, dim)
    add(f"{fs}embed_positions.weight", "embeddings.position_embeddings.weight", positions, dim)
    for p in ("weight", "bias"):
      add(f"{fs}layernorm_embedding.{p}", f"embeddings.LayerNorm.{p}", dim)
    for i in range(layers):
      layer, hf = f"{fs}layers.{i}", f"encoder.layer.{i}"
      names = dict(
        q_proj="attention.self.query",
        k_proj="attention.self.key",
        v_proj="attention.self.value",
        out_proj="attention.output.dense",
      )
      for proj, hf_name in names.items():
        add(f"{layer}.self_attn.{proj}.weight", f"{hf}.{hf_name}.weight", dim, dim)
        add(f"{layer}.self_attn.{proj}.bias", f"{hf}.{hf_name}.bias", dim)
      add(f"{layer}.fc1.weight", f"{hf}.intermediate.dense.weight", mlp, dim)
      add(f"{layer}.fc1.bias", f"{hf}.intermediate.dense.bias", mlp)
      add(f"{layer}.fc2.weight", f"{hf}.output.dense.weight", dim, mlp)
      add(f"{layer}.fc2.bias", f"{hf}.output.dense.bias", dim)
      for p in ("weight", "bias"):
        add(f"{layer}.self_attn_layer_norm.{p}", f"{hf}.attention.output.LayerNorm.{p}", dim)
        add(f"{layer}.final_layer_norm.{p}", f"{hf}.output.LayerNorm.{p}", dim)
    add(f"{fs}version", None, 1)  # fairseq's format-version buffer

  encoder(f.add, "encoder.sentence_encoder.")
  f.add("encoder.regression_head.0.weight", None, 2 * dim, dim)
  f.add("encoder.regression_head.0.bias", None, 2 * dim)
  f.add("encoder.regression_head.2.weight", None, dim, 2 * dim)
  f.add("encoder.regression_head.2.bias", None, dim)
  encoder(f.add_ema, "")  # the EMA copies the sentence encoder
  if head:
    for layer, out in (("dense", dim), ("out_proj", 3)):
      name = f"classification_heads.{head}.{layer}"
      f.add(f"{name}.weight", f"classifier.{layer}.weight", out, dim)
      f.add(f"{name}.bias", f"classifier.{layer}.bias", out)
  return f


def text_cfg():
  """A hydra `data2vec_text` model config (nested `transformer.encoder`)."""
  return dict(
    _name="data2vec_text",
    head_layers=2,
    transformer=dict(dropout=0.1, attention_dropout=0.1, encoder=dict(attention_heads=HEADS)),
  )


def beit(
  *,
  finetuned=False,
  per_layer=True,
  dim=DIM,
  layers=LAYERS,
  mlp=MLP,
  heads=HEADS,
  side=4,
  patch=8,
  classes=5,
  lazy=False,
):
  """BEiT data2vec vision: `modeling_cyclical` (pretrained: shared bias, mask token, final norm,
  `lm_head`) or `modeling_finetune` (per-layer or shared bias, `fc_norm`, `head`)."""
  f = Fixture(lazy=lazy, seed=3)
  rows = (2 * side - 1) ** 2 + 3
  index = image.relative_position_index((side, side)).astype(np.int64)

  def add_index(name, hf_name):
    f.state[name] = index
    f.expected[name] = hf_name

  f.add("cls_token", "embeddings.cls_token", 1, 1, dim)
  f.add(
    "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight", dim, 3, patch, patch
  )
  f.add("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias", dim)
  shared = not (finetuned and per_layer)
  if shared:
    hf = "encoder.relative_position_bias"
    f.add(
      "rel_pos_bias.relative_position_bias_table", f"{hf}.relative_position_bias_table", rows, heads
    )
    add_index("rel_pos_bias.relative_position_index", f"{hf}.relative_position_index")
  for i in range(layers):
    block, hf = f"blocks.{i}", f"encoder.layer.{i}"
    attention = f"{hf}.attention.attention"
    f.add(
      f"{block}.attn.qkv.weight",
      tuple(f"{attention}.{n}.weight" for n in ("query", "key", "value")),
      3 * dim,
      dim,
    )
    f.add(f"{block}.attn.q_bias", f"{attention}.query.bias", dim)
    f.add(f"{block}.attn.v_bias", f"{attention}.value.bias", dim)
    if not shared:
      table = f"{attention}.relative_position_bias"
      f.add(
        f"{block}.attn.relative_position_bias_table",
        f"{table}.relative_position_bias_table",
        rows,
        heads,
      )
      add_index(f"{block}.attn.relative_position_index", f"{table}.relative_position_index")
    f.add(f"{block}.attn.proj.weight", f"{hf}.attention.output.dense.weight", dim, dim)
    f.add(f"{block}.attn.proj.bias", f"{hf}.attention.output.dense.bias", dim)
    f.add(f"{block}.mlp.fc1.weight", f"{hf}.intermediate.dense.weight", mlp, dim)
    f.add(f"{block}.mlp.fc1.bias", f"{hf}.intermediate.dense.bias", mlp)
    f.add(f"{block}.mlp.fc2.weight", f"{hf}.output.dense.weight", dim, mlp)
    f.add(f"{block}.mlp.fc2.bias", f"{hf}.output.dense.bias", dim)
    f.add(f"{block}.gamma_1", f"{hf}.lambda_1", dim)
    f.add(f"{block}.gamma_2", f"{hf}.lambda_2", dim)
    for p in ("weight", "bias"):
      f.add(f"{block}.norm1.{p}", f"{hf}.layernorm_before.{p}", dim)
      f.add(f"{block}.norm2.{p}", f"{hf}.layernorm_after.{p}", dim)
  if finetuned:
    for p in ("weight", "bias"):
      f.add(f"fc_norm.{p}", f"pooler.layernorm.{p}", dim)  # mean pooling: `norm` is Identity
    f.add("head.weight", "classifier.weight", classes, dim)
    f.add("head.bias", "classifier.bias", classes)
  else:
    f.add("mask_token", "embeddings.mask_token", 1, 1, dim)
    for p in ("weight", "bias"):
      f.add(f"norm.{p}", f"layernorm.{p}", dim)
    f.add("lm_head.weight", None, dim, dim)
    f.add("lm_head.bias", None, dim)
  return f


def with_ema(fixture, key):
  """The fixture's state dict with its EMA stored as fairseq does: one entry holding a dict."""
  return {**fixture.state, key: dict(fixture.ema)} if fixture.ema else dict(fixture.state)


# ----------------------------------------------------------------------------- checks

HEAD_KEYS = ("lm_head.", "classifier.")


def check_renamed(out, fixture, *, prefix="", added=()):
  """Every fixture key landed under its HF name with its value (q/k/v: the thirds), every other
  key is listed in `dropped`, and nothing else is in the output (but `added`)."""
  assert out.prefix == prefix

  def full(hf_name):
    return hf_name if hf_name.startswith(HEAD_KEYS) else prefix + hf_name

  produced = set()
  for name, hf_name in fixture.expected.items():
    if isinstance(hf_name, tuple):  # fused [3D, D] -> query, key, value
      for part, third in zip(hf_name, np.split(fixture.state[name], 3)):
        np.testing.assert_array_equal(out.state_dict[full(part)], third)
        produced.add(full(part))
    else:
      np.testing.assert_array_equal(out.state_dict[full(hf_name)], fixture.state[name])
      produced.add(full(hf_name))
  assert set(out.state_dict) == produced | {prefix + k for k in added}
  dropped = {entry.split(": ")[0] for entry in out.dropped}
  assert fixture.dropped <= dropped
  assert all(": " in entry and entry.split(": ", 1)[1] for entry in out.dropped)  # a reason each


def check_teacher(out, fixture, ema_key):
  assert set(out.teacher) == set(fixture.teacher.values())
  for name, hf_name in fixture.teacher.items():
    np.testing.assert_array_equal(out.teacher[hf_name], fixture.ema[name])
  ema_dropped = {f"{ema_key}.{k}" for k in fixture.ema if k not in fixture.teacher}
  assert ema_dropped <= {entry.split(": ")[0] for entry in out.dropped}


def base_model_keys(out):
  """The HF base-model keys of the output (its task heads left out)."""
  return {k: v for k, v in out.state_dict.items() if not k.startswith(HEAD_KEYS)}


def check_lands_in_tree(params, hf_state, table, prefix=""):
  """Every HF key of the converter's table sits at its path in our tree with its layout change,
  and the tree holds nothing else."""
  flat = traverse_util.flatten_dict(params)
  present = {k: e for k, e in table.items() if prefix + k in hf_state}
  for key, entry in present.items():
    np.testing.assert_array_equal(flat[entry.path], entry.to_ours(hf_state[prefix + key]))
  assert set(flat) == {e.path for e in present.values()}


def released_shapes_match(out, expected_table, *, model_name):
  """Names and shapes of a base/large-shaped output against an HF converter's key table."""
  common.check_state_dict(
    base_model_keys(out),
    expected_table.shapes(),
    what=f"HF {model_name} state dict",
    prefix=out.prefix,
    unchecked=(
      "encoder.relative_position_bias.relative_position_index",
      "embeddings.token_type_embeddings.weight",
    ),
  )


# ----------------------------------------------------------------------------- audio


def test_audio_pretrained_lands_in_hf_and_our_tree():
  fixture = fairseq_audio()
  out = fairseq_v1.to_hf(with_ema(fixture, "_ema"), audio_cfg())
  assert (out.modality, out.task) == ("audio", "pretrain")
  check_renamed(out, fixture)
  check_teacher(out, fixture, "_ema")
  assert {e.split(": ")[0] for e in out.dropped} == {"final_proj.0.weight", "final_proj.0.bias"}

  c = out.hf_config
  assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (DIM, 2, HEADS)
  assert (c["conv_kernel"], c["conv_stride"], c["conv_dim"]) == ([*KERNELS], [*STRIDES], [16] * 7)
  assert (c["num_conv_pos_embeddings"], c["conv_pos_kernel_size"]) == (5, 19)
  assert c["num_conv_pos_embedding_groups"] == 16
  assert (c["layer_norm_eps"], c["conv_bias"], c["do_stable_layer_norm"]) == (1e-5, False, False)
  assert (c["hidden_dropout"], c["activation_dropout"], c["layerdrop"]) == (0.1, 0.0, 0.05)

  params = hf_audio.params_from_hf(out.state_dict, c)
  check_lands_in_tree(params, out.state_dict, hf_audio.expected_keys(c))
  # One layout change by hand: q_proj [D, D] -> DenseGeneral [D, H, Dh].
  q = fixture.state["encoder.layers.1.self_attn.q_proj.weight"]
  kernel = params["encoder"]["blocks"]["layer_01"]["attention"]["query"]["kernel"]
  np.testing.assert_array_equal(kernel, q.T.reshape(DIM, HEADS, DIM // HEADS))
  np.testing.assert_array_equal(params["mask_emb"], fixture.state["mask_emb"])
  # The teacher holds the encoder (HF names), which the same converter reads.
  assert set(out.teacher) < set(out.state_dict)


def test_audio_ctc_lands_in_hf_and_our_tree():
  fixture = fairseq_audio(ctc_vocab=32)
  cfg = audio_cfg(
    dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.1,
    mask_prob=0.5,
    mask_channel_prob=0.1,
    mask_length=10,
    mask_channel_length=64,
  )
  out = fairseq_v1.to_hf(fixture.state, cfg)
  assert (out.modality, out.task, out.teacher) == ("audio", "ctc", None)
  check_renamed(out, fixture, prefix=hf_audio.TASK_MODEL_PREFIX)
  assert out.dropped == ()

  c = out.hf_config
  assert c["vocab_size"] == 32
  # The fine-tuning config overrides the pretraining one (fairseq's Wav2VecEncoder does).
  assert (c["hidden_dropout"], c["final_dropout"], c["layerdrop"]) == (0.0, 0.0, 0.1)
  assert (c["attention_dropout"], c["num_attention_heads"]) == (0.1, HEADS)
  assert (c["mask_time_prob"], c["mask_feature_prob"], c["mask_feature_length"]) == (0.5, 0.1, 64)
  assert out.state_dict["lm_head.weight"].shape == (32, DIM)

  params = hf_audio.params_from_hf(base_model_keys(out), c, prefix=out.prefix)
  check_lands_in_tree(params, out.state_dict, hf_audio.expected_keys(c), out.prefix)


def test_audio_mask_embedding_is_dropped_when_the_hf_config_masks_nothing():
  fixture = fairseq_audio(ctc_vocab=8)
  out = fairseq_v1.to_hf(fixture.state, audio_cfg(mask_prob=0.0, mask_channel_prob=0.0))
  assert "data2vec_audio.masked_spec_embed" not in out.state_dict
  assert any(e.startswith("w2v_encoder.w2v_model.mask_emb: ") for e in out.dropped)
  hf_audio.params_from_hf(base_model_keys(out), out.hf_config, prefix=out.prefix)


def test_audio_whole_model_ema_and_bookkeeping():
  """An EMA of the whole model (`ema_transformer_only=False`) has the model's own names; its
  regression head and the squared-momentum bookkeeping are dropped."""
  fixture = fairseq_audio(ema=False)
  ema = {k: v for k, v in fixture.state.items() if k.startswith(("encoder.", "final_proj"))}
  state = {**fixture.state, "_ema": {**ema, "__sq_mom": {}}}
  out = fairseq_v1.to_hf(state, audio_cfg())
  assert set(out.teacher) == {fixture.expected[k] for k in ema if k in fixture.expected}
  dropped = {e.split(": ")[0] for e in out.dropped}
  assert {"_ema.final_proj.0.weight", "_ema.final_proj.0.bias", "_ema.__sq_mom"} <= dropped


def test_audio_without_cfg_needs_a_released_width():
  with pytest.raises(common.ConversionError, match="attention heads"):
    fairseq_v1.to_hf(fairseq_audio(ema=False).state)


@pytest.mark.parametrize(
  "size, dim, layers, mlp", [("base", 768, 12, 3072), ("large", 1024, 24, 4096)]
)
@pytest.mark.parametrize("ctc_vocab", [None, 32])
def test_audio_released_shapes(size, dim, layers, mlp, ctc_vocab):
  """audio_base_ls*.pt / vox_*.pt: names and shapes, no cfg (the released defaults)."""
  fixture = fairseq_audio(
    dim=dim, layers=layers, mlp=mlp, conv_dim=512, ctc_vocab=ctc_vocab, lazy=True
  )
  out = fairseq_v1.to_hf(with_ema(fixture, "_ema"))
  c = out.hf_config
  assert c["num_attention_heads"] == {768: 12, 1024: 16}[dim]
  assert (c["conv_stride"], c["num_conv_pos_embeddings"], c["conv_pos_kernel_size"]) == (
    [*STRIDES],
    5,
    19,
  )
  assert hf_audio.config_from_hf(c).variant == size
  released_shapes_match(out, hf_audio.expected_keys(c), model_name="Data2VecAudio")
  if ctc_vocab is None:
    assert len(out.teacher) == 16 * layers + 2 + 10  # blocks, final LN, 5 pos convs


# ----------------------------------------------------------------------------- text


def test_text_pretrained_lands_in_hf_and_our_tree():
  fixture = fairseq_text()
  out = fairseq_v1.to_hf(with_ema(fixture, "encoder._ema"), text_cfg())
  assert (out.modality, out.task) == ("text", "pretrain")
  token_types = "embeddings.token_type_embeddings.weight"
  check_renamed(out, fixture, added=(token_types,))
  np.testing.assert_array_equal(out.state_dict[token_types], np.zeros((1, DIM)))
  check_teacher(out, fixture, "encoder._ema")
  assert "encoder._ema.version" in {e.split(": ")[0] for e in out.dropped}

  c = out.hf_config
  assert (c["vocab_size"], c["max_position_embeddings"], c["type_vocab_size"]) == (50, 10, 1)
  assert (c["pad_token_id"], c["layer_norm_eps"], c["num_attention_heads"]) == (1, 1e-5, HEADS)

  params = hf_text.params_from_hf(out.state_dict, c)
  # The zero token type row folds into the positions without changing them.
  check_lands_in_tree(params, out.state_dict, hf_text.expected_keys(c))


def test_text_old_names_and_mlm_head():
  """Old fairseq names (`decoder.*`, `emb_layer_norm`) are read as fairseq's upgrade does; the
  MLM head (`encoder.lm_head.*`) is dropped."""
  fixture = fairseq_text()
  state = {}
  for key, value in fixture.state.items():
    key = key.replace(".layernorm_embedding.", ".emb_layer_norm.")
    state[key.replace("encoder.", "decoder.", 1) if key.startswith("encoder.") else key] = value
  state["decoder.lm_head.dense.weight"] = np.ones((DIM, DIM), np.float32)
  out = fairseq_v1.to_hf(state, text_cfg())
  assert "decoder.lm_head.dense.weight" in {e.split(": ")[0] for e in out.dropped}
  embed_norm = fixture.state["encoder.sentence_encoder.layernorm_embedding.weight"]
  np.testing.assert_array_equal(out.state_dict["embeddings.LayerNorm.weight"], embed_norm)
  assert len(out.state_dict) == len(fixture.expected) + 1  # + token types


def test_text_classification_head():
  fixture = fairseq_text(head="mnli")
  out = fairseq_v1.to_hf(fixture.state, text_cfg())
  assert (out.task, out.teacher, out.hf_config["num_labels"]) == ("classify", None, 3)
  check_renamed(
    out,
    fixture,
    prefix=hf_text.TASK_MODEL_PREFIX,
    added=("embeddings.token_type_embeddings.weight",),
  )
  params = hf_text.params_from_hf(base_model_keys(out), out.hf_config, prefix=out.prefix)
  check_lands_in_tree(params, out.state_dict, hf_text.expected_keys(out.hf_config), out.prefix)


def test_text_several_classification_heads_raise():
  state = fairseq_text(head="mnli").state
  state.update(fairseq_text(head="rte").state)
  with pytest.raises(common.ConversionError, match="mnli, rte"):
    fairseq_v1.to_hf(state, text_cfg())


def test_text_released_shapes():
  """nlp_base.pt: names and shapes, no cfg."""
  fixture = fairseq_text(vocab=50265, positions=514, dim=768, layers=12, mlp=3072, lazy=True)
  out = fairseq_v1.to_hf(with_ema(fixture, "encoder._ema"))
  assert hf_text.config_from_hf(out.hf_config).variant == "base"
  released_shapes_match(out, hf_text.expected_keys(out.hf_config), model_name="Data2VecText")


# ----------------------------------------------------------------------------- vision


def test_vision_pretrained_lands_in_hf_and_our_tree():
  fixture = beit()
  out = fairseq_v1.to_hf(fixture.state, dict(layer_scale_init_value=1e-4, drop_path=0.25))
  assert (out.modality, out.task, out.teacher) == ("image", "pretrain", None)
  check_renamed(out, fixture)
  assert {e.split(": ")[0] for e in out.dropped} == {"lm_head.weight", "lm_head.bias"}

  c = out.hf_config
  assert (c["image_size"], c["patch_size"], c["num_attention_heads"]) == (32, 8, HEADS)
  assert (c["use_shared_relative_position_bias"], c["use_relative_position_bias"]) == (True, False)
  assert (c["use_mean_pooling"], c["use_mask_token"], c["layer_norm_eps"]) == (False, True, 1e-6)
  assert (c["layer_scale_init_value"], c["drop_path_rate"]) == (1e-4, 0.25)

  # hf_image also checks the carried relative_position_index against ours.
  params = hf_image.params_from_hf(out.state_dict, c)
  check_lands_in_tree(params, out.state_dict, hf_image.expected_keys(c))
  qkv = fixture.state["blocks.0.attn.qkv.weight"]
  key = params["encoder"]["blocks"]["layer_00"]["attention"]["key"]
  np.testing.assert_array_equal(key["kernel"], qkv[DIM : 2 * DIM].T.reshape(DIM, HEADS, -1))
  assert "bias" not in key  # BEiT has no key bias


@pytest.mark.parametrize("per_layer", [True, False])
def test_vision_finetuned_names(per_layer):
  """finetuned_*/mp_rank_00_model_states.pt: per-layer bias tables (as HF converts them), or the
  shared table data2vec_vision's `run_class_finetuning.py` keeps. hf_image reads neither layout
  today (mean pooling, per-layer tables): names, values and config only."""
  fixture = beit(finetuned=True, per_layer=per_layer)
  out = fairseq_v1.to_hf(fixture.state)
  assert (out.task, out.prefix) == ("classify", hf_image.TASK_MODEL_PREFIX)
  check_renamed(out, fixture, prefix=hf_image.TASK_MODEL_PREFIX)
  assert out.dropped == ()
  c = out.hf_config
  assert (c["use_relative_position_bias"], c["use_shared_relative_position_bias"]) == (
    per_layer,
    not per_layer,
  )
  assert (c["use_mean_pooling"], c["use_mask_token"], c["num_labels"]) == (True, False, 5)
  assert "data2vec_vision.pooler.layernorm.weight" in out.state_dict


@pytest.mark.parametrize(
  "size, dim, layers, heads", [("base", 768, 12, 12), ("large", 1024, 24, 16)]
)
def test_vision_released_shapes(size, dim, layers, heads):
  """checkpoint-799.pth (base_800, large_800, large_1600): names and shapes, no cfg."""
  fixture = beit(dim=dim, layers=layers, mlp=4 * dim, heads=heads, side=14, patch=16, lazy=True)
  out = fairseq_v1.to_hf(fixture.state)
  c = out.hf_config
  assert (c["image_size"], c["num_attention_heads"]) == (224, heads)
  assert hf_image.config_from_hf(c).variant == size
  released_shapes_match(out, hf_image.expected_keys(c), model_name="Data2VecVision")


def test_vision_teacher_is_the_model_ema_dict():
  """BEiT stores the teacher as a separate `model_ema` dict of the model's own layout."""
  fixture = beit()
  out = fairseq_v1.to_hf(fixture.state)
  ema = fairseq_v1.to_hf({k: v + 1 for k, v in fixture.state.items()})
  assert set(ema.state_dict) == set(out.state_dict)


# ----------------------------------------------------------------------------- errors


def test_detect_modality():
  assert fairseq_v1.detect_modality(fairseq_audio(ema=False).state) == "audio"
  assert fairseq_v1.detect_modality(fairseq_audio(ctc_vocab=4).state) == "audio"
  assert fairseq_v1.detect_modality(fairseq_text().state) == "text"
  assert fairseq_v1.detect_modality(beit().state) == "image"
  with pytest.raises(ValueError, match="already HF names"):
    fairseq_v1.detect_modality({"embeddings.word_embeddings.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="several modalities"):
    fairseq_v1.detect_modality({**fairseq_text().state, **beit().state})


def test_unknown_keys_raise_listing_every_one():
  fixture = fairseq_audio()
  state = with_ema(fixture, "_ema")
  state["encoder.extra.weight"] = np.zeros(2)
  state["quantizer.vars"] = np.zeros(2)
  state["_ema"]["layers.0.adapter.weight"] = np.zeros(2)
  with pytest.raises(common.ConversionError) as error:
    fairseq_v1.to_hf(state, audio_cfg())
  message = str(error.value)
  assert "unknown keys (3)" in message
  for key in ("encoder.extra.weight", "quantizer.vars", "_ema.layers.0.adapter.weight"):
    assert key in message


@pytest.mark.parametrize("extra", ["blocks.0.attn.relative_position_bias.x", "pos_embed"])
def test_unknown_vision_keys_raise(extra):
  state = {**beit().state, extra: np.zeros(2)}
  with pytest.raises(common.ConversionError, match=extra.replace(".", r"\.")):
    fairseq_v1.to_hf(state)


def test_data2vec2_checkpoint_raises_with_a_hint():
  state = {
    "modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight": np.zeros((512, 1, 10)),
    "blocks.0.attn.qkv.weight": np.zeros((2304, 768)),
    "_ema": {"blocks.0.attn.qkv.weight": np.zeros((2304, 768))},
  }
  with pytest.raises(common.ConversionError, match="data2vec 2.0"):
    fairseq_v1.to_hf(state)
