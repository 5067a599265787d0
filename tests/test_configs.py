"""Tests for configs/audio.py, configs/common.py and `build_model` sizes (spec §1.1, §1.5)."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import audio as audio_config
from configs import common
from configs import image as image_config
from configs import text as text_config
from d2v_jax import train
from d2v_jax.models import variants
from d2v_jax.models.data2vec import build_model, example_inputs
from tests import helpers

AUDIO_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "audio.py")


@pytest.mark.parametrize("variant", ["tiny", "base", "large"])
def test_audio_config_builds_for_every_variant(variant):
  config = audio_config.get_config(f"variant={variant}")
  assert config.model.variant == variant and config.modality == "audio"
  assert config.targets.top_k <= variants.decode_variant("audio", variant)["num_layers"]
  assert config.input.batch_size > 0 and len(config.input.crop_lengths) >= 1
  assert config.optim.schedule in ("tri_stage", "cosine", "constant")


def test_default_variant_is_tiny():
  assert audio_config.get_config().model.variant == "tiny"
  assert (
    audio_config.get_config(None).to_dict() == audio_config.get_config("variant=tiny").to_dict()
  )


def test_base_config_follows_the_paper_recipe():
  """Spec §1.2–§1.5, audio base."""
  c = audio_config.get_config("variant=base")
  assert (c.masking.prob, c.masking.length, c.masking.min_masks) == (0.65, 10, 1)
  assert (c.targets.top_k, c.targets.layer_output, c.targets.layer_norm, c.targets.final_norm) == (
    8,
    "ffn",
    "instance",
    "none",
  )
  assert c.loss.beta == 0.0 and c.loss.scale < 0  # L2 with 1/√D
  assert (c.ema.decay, c.ema.end_decay, c.ema.anneal_steps) == (0.999, 0.9999, 30_000)
  assert tuple(c.ema.teacher_params) == ("encoder",)
  assert tuple(c.ema.copy_params) == (r"^encoder/pos_conv/",)
  o = c.optim
  assert (o.name, o.lr, o.b1, o.b2, o.eps, o.weight_decay) == ("adam", 5e-4, 0.9, 0.98, 1e-6, 0.01)
  assert (o.schedule, o.warmup_frac, o.hold_frac, o.decay_frac) == ("tri_stage", 0.03, 0.9, 0.07)
  assert (o.init_lr_scale, o.final_lr_scale, o.clip_norm) == (0.01, 0.01, 0.0)
  assert c.loop.total_steps == 400_000
  m = c.model
  assert (m.dropout, m.attention_dropout, m.activation_dropout, m.layerdrop) == (
    0.1,
    0.1,
    0.0,
    0.05,
  )


def test_unknown_variant_is_rejected():
  with pytest.raises((KeyError, ValueError)):
    audio_config.get_config("variant=xl")


def test_parse_arg_types_flags_and_errors():
  p = common.parse_arg(
    "variant=base, steps=12,lr=3e-4,runlocal",
    variant="tiny",
    steps=5,
    lr=1e-3,
    runlocal=False,
    fast=True,
  )
  assert (p.variant, p.steps, p.lr, p.runlocal, p.fast) == ("base", 12, 3e-4, True, True)
  assert isinstance(p.steps, int) and isinstance(p.lr, float)
  assert common.parse_arg("fast=false", fast=True).fast is False
  assert common.parse_arg("fast=1", fast=False).fast is True
  assert common.parse_arg(None, variant="tiny").variant == "tiny"
  assert common.parse_arg("", variant="tiny").variant == "tiny"
  with pytest.raises(ValueError, match="Unknown config argument"):
    common.parse_arg("varient=base", variant="tiny")
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("steps", steps=5)
  with pytest.raises(ValueError):
    common.parse_arg("steps=many", steps=5)


def _load(*args):
  """Parses a command line with `--config` defined as main.py defines it (lock_config=True)."""
  argv = ["main.py", *args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    "config", None, "Config file.", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return holder.value


def test_config_flag_overrides_and_lock():
  config = _load(
    f"--config={AUDIO_CONFIG}:variant=base", "--config.optim.lr=0.001", "--config.targets.top_k=6"
  )
  assert config.model.variant == "base" and config.optim.lr == 0.001 and config.targets.top_k == 6
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.optim.lrr = 1.0  # typo: cannot add a field
  with pytest.raises(TypeError):
    config.optim.lr = "fast"  # type-safe
  with pytest.raises(AttributeError):
    _load(f"--config={AUDIO_CONFIG}", "--config.optim.lrr=0.001")
  with pytest.raises(flags.IllegalFlagValueError):
    _load(f"--config={AUDIO_CONFIG}:varient=base")


def test_locked_config_dict_rejects_new_fields():
  config = audio_config.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.model.num_layer = 3
  with pytest.raises(AttributeError):
    config.modle = ml_collections.ConfigDict()


def expected_audio_params(
  num_layers,
  dim,
  num_heads,
  mlp_dim,
  conv_dim,
  pos_conv_depth,
  pos_conv_kernel,
  pos_conv_groups,
  head=True,
):
  """Parameter count of the fairseq/HF data2vec-audio layout, counted by hand (spec §1.1)."""
  del num_heads  # q/k/v/out are D×D whatever the head count
  c = conv_dim
  cnn = 10 * 1 * c + 4 * 3 * c * c + 2 * 2 * c * c + 7 * 2 * c  # convs (no bias) + LNs
  frontend = cnn + 2 * c + c * dim + dim  # feature LN + projection
  pos = pos_conv_depth * (pos_conv_kernel * (dim // pos_conv_groups) * dim + dim)
  block = 4 * (dim * dim + dim) + 2 * 2 * dim + dim * mlp_dim + mlp_dim + mlp_dim * dim + dim
  encoder = pos + 2 * dim + num_layers * block
  total = frontend + encoder + dim  # + mask_emb
  return total + (dim * dim + dim if head else 0)


def _param_shapes(model, length=400):
  x = jnp.zeros((1, length))
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros(x.shape, bool), train=False)["params"]
  )


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant,low,high", [("base", 90e6, 100e6), ("large", 300e6, 330e6)])
def test_base_and_large_param_counts(variant, low, high):
  model = build_model("audio", audio_config.get_config(f"variant={variant}").model)
  shapes = _param_shapes(model)
  sizes = variants.decode_variant("audio", variant)
  assert _count(shapes) == expected_audio_params(**sizes)
  without_head = _count(shapes) - _count(shapes["final_proj"])
  assert low < without_head < high, without_head
  if variant == "base":  # HF data2vec-audio-base: ~93.2M (encoder + frontend + mask embedding)
    assert 93.0e6 < without_head < 93.3e6, without_head


def test_tiny_variant_builds_and_runs():
  config = audio_config.get_config()
  model = build_model("audio", config.model)
  x = jnp.zeros((2, 800))
  pad = jnp.zeros((2, 800), bool).at[1, 500:].set(True)
  (out, aux), variables = helpers.fast_jit(
    lambda: model.init_with_output(jax.random.key(0), x, pad, train=False)
  )()
  sizes = variants.decode_variant("audio", "tiny")
  assert _count(variables["params"]) == expected_audio_params(**sizes)
  assert out.shape == (2, 2, sizes["dim"])
  assert len(aux["layers"]) == sizes["num_layers"] >= config.targets.top_k
  assert bool(jnp.isfinite(out[0]).all())


def test_size_fields_override_the_variant():
  model = helpers.tiny_model()
  shapes = _param_shapes(model)
  sizes = {**variants.decode_variant("audio", "tiny"), **helpers.TINY_SIZES}
  assert _count(shapes) == expected_audio_params(**sizes)
  assert shapes["encoder"]["blocks"]["layer_01"]["fc1"]["kernel"].shape == (32, 64)
  assert "layer_02" not in shapes["encoder"]["blocks"]


def test_unknown_modality_or_variant_raises():
  with pytest.raises(ValueError, match="variant"):
    variants.decode_variant("audio", "huge")
  with pytest.raises(ValueError, match="modality"):
    variants.decode_variant("smell", "base")
  cfg = audio_config.get_config().model
  with pytest.raises(ValueError):
    build_model("smell", cfg)


def test_image_config_follows_data2vec_vision():
  """spec §1.5 vision: AdamW 0.9/0.999, wd 0.05 (not on 1-D/bias/position table), clip 3."""
  config = image_config.get_config("variant=base")
  assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.999, 1e-8)
  assert (config.optim.weight_decay, config.optim.decay_1d, config.optim.clip_norm) == (
    0.05,
    False,
    3.0,
  )
  assert (config.optim.lr, config.optim.schedule, config.optim.end_lr) == (2e-3, "cosine", 1e-5)
  assert config.optim.warmup_steps == 10 * (1_281_167 // 2048)
  assert (config.ema.decay, config.ema.end_decay) == (0.9998, 0.9998)
  assert (config.targets.top_k, config.targets.layer_output) == (6, "block")
  assert (config.loss.beta, config.loss.reduce_dims) == (2.0, "mean")
  assert config.model.image_size == config.input.image_size == 224
  with config.unlocked():
    config.model.image_size = 160  # one field shared by model and input
  assert config.input.image_size == 160
  assert image_config.get_config("variant=large").model.layer_scale_init == 1e-5


def test_text_config_follows_data2vec_text():
  config = text_config.get_config("variant=base")
  assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.98, 1e-6)
  assert (config.optim.weight_decay, config.optim.clip_norm, config.optim.lr) == (0.01, 5.0, 2e-4)
  ema = config.ema
  assert (ema.decay, ema.end_decay, ema.anneal_steps) == (0.999, 0.9999, 300_000)
  assert config.ema.copy_params == (r"^frontend/",)
  assert (config.targets.top_k, config.targets.layer_output) == (10, "ffn")
  assert (config.loss.beta, config.loss.scale, config.loss.reduce_dims) == (4.0, 1.0, "sum")
  assert (config.masking.span_prob, config.masking.span_length) == (0.35, 4)
  assert (config.model.dropout, config.model.attention_dropout) == (0.1, 0.1)
  assert config.model.max_positions == config.input.max_length == 512
  with pytest.raises(ValueError, match="no v1 large"):
    text_config.get_config("variant=large")


@pytest.mark.parametrize(
  "modality,variant,low,high",
  [
    # HF data2vec-vision-base (shared bias, mask token): 85.7M without heads (spec §4).
    ("image", "base", 85.5e6, 86.5e6),
    ("image", "large", 302e6, 306e6),
    # RoBERTa-base / data2vec-text-base: 124.6M with the 50,265-token embedding.
    ("text", "base", 124e6, 125e6),
  ],
)
def test_image_and_text_param_counts(modality, variant, low, high):
  module = image_config if modality == "image" else text_config
  config = module.get_config(f"variant={variant}")
  if modality == "text":
    config.model.vocab_size = 50265
  model = build_model(modality, config.model)
  inputs = example_inputs(modality, config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False)["params"])
  without_head = _count(shapes) - _count(shapes["final_proj"])
  assert low < without_head < high, without_head


def test_text_vocabulary_comes_from_the_tokenizer():
  config = text_config.get_config()
  train.complete_config(config)
  assert (config.model.vocab_size, config.masking.mask_id) == (4096, 4095)
  config.model.vocab_size = 5000
  with pytest.raises(ValueError, match=r"config.model.vocab_size=5000 but the tokenizer"):
    train.complete_config(config)
