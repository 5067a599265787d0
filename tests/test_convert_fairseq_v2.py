"""data2vec 2.0 fairseq checkpoints -> our `version=2` models (d2v_jax/convert/fairseq_v2.py).

fairseq's code cannot run here, so the state dicts are synthetic: every key name and shape that
fairseq's `data2vec_multi` modules create (`data2vec2.py`, `modalities/{base,audio,images,text,
modules}.py`, `mae_image_classification.py`, `wav2vec2_asr.py`), written out below from that code,
with random values. The checks do not reuse the converter's tables:
  - images and text: a numpy forward pass written in fairseq's layout (torch Linear/Conv
    weights, fused qkv, post-LN AltBlocks, the context encoder, the conv decoders) against our
    model with the converted weights;
  - speech: each tensor's landing place and layout (CNN, positional convs, ALiBi scales);
  - the EMA teacher, the fine-tuned layouts (CTC, image and text classifiers), errors, and a
    work directory imported from a 2.0 file that resumes pretraining.
The released checkpoints were checked this way by name and shape only (README).
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import workdir as workdir_config
from d2v_jax import checkpoint, extract, train
from d2v_jax.convert import common, fairseq_v1, fairseq_v2, files, workdir
from d2v_jax.models import image

D, H, MLP = 32, 4, 64  # width, heads, FFN
CFG = {"num_heads": H}  # the heads: no weight shape holds them (speech: its ALiBi scales do)
RNG = np.random.default_rng(0)


def _w(*shape):
  return RNG.normal(0.0, 0.2, shape).astype(np.float32)


def _norm(out, name, dim):
  out[f"{name}.weight"] = 1.0 + _w(dim)
  out[f"{name}.bias"] = _w(dim)


def _linear(out, name, n_out, n_in):
  out[f"{name}.weight"] = _w(n_out, n_in)
  out[f"{name}.bias"] = _w(n_out)


def _block(out, name):
  """fairseq `AltBlock`: norm1, attn.qkv (fused, biased), attn.proj, norm2, mlp.fc1, mlp.fc2."""
  _norm(out, f"{name}.norm1", D)
  _linear(out, f"{name}.attn.qkv", 3 * D, D)
  _linear(out, f"{name}.attn.proj", D, D)
  _norm(out, f"{name}.norm2", D)
  _linear(out, f"{name}.mlp.fc1", MLP, D)
  _linear(out, f"{name}.mlp.fc2", D, MLP)


def _decoder(out, m, in_dim, width, groups, kernel, layers, ndim, projection_layers):
  """`Decoder1d` / `Decoder2d`: blocks.j = Sequential(Conv, SamePad, ...); proj (or proj.0/.2)."""
  for j in range(layers):
    c_in = in_dim if j == 0 else width
    out[f"{m}decoder.blocks.{j}.0.weight"] = _w(width, c_in // groups, *(kernel,) * ndim)
    out[f"{m}decoder.blocks.{j}.0.bias"] = _w(width)
  if projection_layers == 1:
    _linear(out, f"{m}decoder.proj", in_dim, width)
  else:
    _linear(out, f"{m}decoder.proj.0", 2 * width, width)
    _linear(out, f"{m}decoder.proj.2", in_dim, 2 * width)


AUDIO = dict(conv_dim=16, pos_depth=2, pos_kernel=5, pos_groups=4, layers=2)


def fairseq_audio() -> dict:
  """`data2vec_multi` speech pretraining: CNN, feature projection, positional convs, ALiBi scales,
  context-encoder norm (no prenet), decoder (384/16/7/4 scaled down), main blocks."""
  m, out, c = "modality_encoders.AUDIO.", {}, AUDIO["conv_dim"]
  for j, k in enumerate((10, 3, 3, 3, 3, 2, 2)):
    out[f"{m}local_encoder.conv_layers.{j}.0.weight"] = _w(c, 1 if j == 0 else c, k)
    _norm(out, f"{m}local_encoder.conv_layers.{j}.2.1", c)
  _norm(out, f"{m}project_features.1", c)
  _linear(out, f"{m}project_features.2", D, c)
  for j in range(1, AUDIO["pos_depth"] + 1):  # index 0 is a TransposeLast
    out[f"{m}relative_positional_encoder.{j}.0.weight"] = _w(
      D, D // AUDIO["pos_groups"], AUDIO["pos_kernel"]
    )
    out[f"{m}relative_positional_encoder.{j}.0.bias"] = _w(D)
  out[f"{m}alibi_scale"] = np.abs(_w(1, 1, H, 1, 1))
  _norm(out, f"{m}context_encoder.norm", D)
  _decoder(out, m, D, 16, 4, 3, 2, 1, 1)
  for i in range(AUDIO["layers"]):
    _block(out, f"blocks.{i}")
  return out


IMAGE = dict(image_size=32, patch=4, prenet=1, layers=2)


def fairseq_image() -> dict:
  """Image pretraining: patch embedding, frozen sin-cos positions, CLS, context-encoder norm and
  prenet blocks, the 2-D decoder, main blocks (base: 2 + 10)."""
  m, out, p = "modality_encoders.IMAGE.", {}, IMAGE["patch"]
  _linear(out, f"{m}local_encoder.proj", D, 3)
  out[f"{m}local_encoder.proj.weight"] = _w(D, 3, p, p)
  side = IMAGE["image_size"] // p
  out[f"{m}fixed_positional_encoder.positions"] = image.sincos_2d(D, side)[None]
  out[f"{m}extra_tokens"] = _w(1, 1, D)
  _norm(out, f"{m}context_encoder.norm", D)
  for j in range(IMAGE["prenet"]):
    _block(out, f"{m}context_encoder.blocks.{j}")
  _decoder(out, m, D, 16, 4, 3, 2, 2, 1)
  for i in range(IMAGE["layers"]):
    _block(out, f"blocks.{i}")
  return out


TEXT = dict(vocab=50, positions=16, layers=2)


def fairseq_text() -> dict:
  """Text pretraining: embeddings with their LayerNorm, no context-encoder norm (no prenet), the
  1-D decoder without groups and with a two-layer projection, main blocks."""
  m, out = "modality_encoders.TEXT.", {}
  out[f"{m}local_encoder.embed_tokens.weight"] = _w(TEXT["vocab"], D)
  out[f"{m}local_encoder.embed_positions.weight"] = _w(TEXT["positions"] + 2, D)
  _norm(out, f"{m}local_encoder.layernorm_embedding", D)
  _decoder(out, m, D, 16, 1, 3, 2, 1, 2)
  for i in range(TEXT["layers"]):
    _block(out, f"blocks.{i}")
  return out


def _ema_of(state: dict, modality: str) -> dict:
  """fairseq's `_ema`: the teacher copy's state dict (spec §2.3's EMA'd parts)."""
  noisy = {k: v if k.endswith("positions") else v + 0.01 for k, v in state.items()}
  if modality == "text":  # ema_encoder_only: the block list itself
    return {k[len("blocks.") :]: v for k, v in noisy.items() if k.startswith("blocks.")}
  shared = ("local_encoder.", "project_features.") if modality == "audio" else ()
  return {
    k: v for k, v in noisy.items() if ".decoder." not in k and not any(s in k for s in shared)
  }


# ----------------------------------------------------------------------------- numpy fairseq


def _ln(x, w=None, b=None, eps=1e-5):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  return y if w is None else y * w + b


def _gelu(x):
  return np.asarray(jax.nn.gelu(x, approximate=False))


def _lin(x, s, name):
  return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def _alt_block(x, s, name, eps):
  """fairseq AltBlock (post-LN, ffn targets): x + attn -> norm1 -> r; norm2(r + mlp(r))."""
  b, n, _ = x.shape
  qkv = _lin(x, s, f"{name}.attn.qkv").reshape(b, n, 3, H, D // H).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv  # [B, H, N, Dh]
  att = q @ k.transpose(0, 1, 3, 2) * (D // H) ** -0.5
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  a = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, D)
  x = x + _lin(a, s, f"{name}.attn.proj")
  r = _ln(x, s[f"{name}.norm1.weight"], s[f"{name}.norm1.bias"], eps)
  f = _lin(_gelu(_lin(r, s, f"{name}.mlp.fc1")), s, f"{name}.mlp.fc2")
  return _ln(r + f, s[f"{name}.norm2.weight"], s[f"{name}.norm2.bias"], eps)


def _conv_same(x, w, bias):
  """torch Conv1d/Conv2d, stride 1, padding k//2, groups = C_in / w.shape[1]; odd k (no SamePad
  trim). x: [C_in, *S] -> [C_out, *S]."""
  c_in, (c_out, per_group, *kernel) = x.shape[0], w.shape
  groups, pad = c_in // per_group, kernel[0] // 2
  xp = np.pad(x, [(0, 0)] + [(pad, pad)] * len(kernel))
  out = np.zeros((c_out, *x.shape[1:]), np.float64)
  per_out = c_out // groups
  for o in range(c_out):
    g = o // per_out
    xs = xp[g * per_group : (g + 1) * per_group]
    for offset in np.ndindex(*kernel):
      window = xs[(slice(None), *(slice(o_, o_ + n) for o_, n in zip(offset, x.shape[1:])))]
      out[o] += np.tensordot(w[(o, slice(None), *offset)], window, axes=(0, 0))
  return out + bias.reshape(-1, *(1,) * len(kernel))


def _decode(x, s, m, residual_on, grid=None):
  """fairseq Decoder1d/2d on [N, D] (one sample): conv -> LN (no affine) -> GELU, plus the
  previous layer's output when `residual_on` and the widths match."""
  j, h = 0, x.T  # [C, N]
  if grid is not None:
    h = h.reshape(-1, *grid)
  residual = h
  while f"{m}decoder.blocks.{j}.0.weight" in s:
    y = _conv_same(h, s[f"{m}decoder.blocks.{j}.0.weight"], s[f"{m}decoder.blocks.{j}.0.bias"])
    y = np.moveaxis(_gelu(_ln(np.moveaxis(y, 0, -1))), -1, 0)
    h = y + residual if residual_on and y.shape == residual.shape else y
    residual, j = h, j + 1
  h = h.reshape(h.shape[0], -1).T  # [N, C]
  if f"{m}decoder.proj.0.weight" in s:
    return _lin(_gelu(_lin(h, s, f"{m}decoder.proj.0")), s, f"{m}decoder.proj.2")
  return _lin(h, s, f"{m}decoder.proj")


# ----------------------------------------------------------------------------- helpers


def _apply(imported, method, *args):
  from d2v_jax.models import data2vec2

  model = data2vec2.build_model(imported.modality, imported.model_cfg)
  return model.apply({"params": imported.params}, *args, method=method)


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return np.asarray(tree)


# ----------------------------------------------------------------------------- tests


def test_image_encoder_and_decoder_match_fairseqs_forward():
  s = fairseq_image()
  imported = fairseq_v2.from_fairseq(s, CFG)
  assert imported.version == 2 and imported.head_cfg is None
  cfg = imported.model_cfg
  assert (cfg.num_layers, cfg.prenet_depth, cfg.dim, cfg.num_heads) == (3, 1, D, H)
  assert (cfg.image_size, cfg.patch_size, cfg.norm_eps) == (32, 4, 1e-6)
  assert cfg.decoder.to_dict() == dict(
    dim=16, kernel=3, groups=4, layers=2, residual=True, projection_layers=1, input_dropout=0.0
  )
  images = RNG.normal(size=(2, 32, 32, 3)).astype(np.float32)

  def encode(model, x):
    tokens, padding = model.embed(x, None, train=False)
    out, aux = model.encode(tokens, padding, train=False)
    return out, aux["cls"], model.decoder(out, None)

  out, cls, decoded = _apply(imported, encode, jnp.asarray(images))

  m, p = "modality_encoders.IMAGE.", 4
  patches = images.reshape(2, 8, p, 8, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 64, 3 * p * p)
  weight = s[f"{m}local_encoder.proj.weight"].reshape(D, -1)
  x = patches @ weight.T + s[f"{m}local_encoder.proj.bias"]
  x = x + s[f"{m}fixed_positional_encoder.positions"]
  x = np.concatenate([np.broadcast_to(s[f"{m}extra_tokens"], (2, 1, D)), x], axis=1)
  x = _ln(x, s[f"{m}context_encoder.norm.weight"], s[f"{m}context_encoder.norm.bias"], 1e-6)
  for name in (f"{m}context_encoder.blocks.0", "blocks.0", "blocks.1"):
    x = _alt_block(x, s, name, 1e-6)
  np.testing.assert_allclose(out, x[:, 1:], atol=1e-4)
  np.testing.assert_allclose(cls, x[:, 0], atol=1e-4)
  reference = _decode(x[0, 1:], s, m, True, grid=(8, 8))
  np.testing.assert_allclose(decoded[0], reference, atol=1e-4)


def test_text_encoder_and_decoder_match_fairseqs_forward():
  s = fairseq_text()
  imported = fairseq_v2.from_fairseq(s, CFG)
  cfg = imported.model_cfg
  assert (cfg.vocab_size, cfg.max_positions, cfg.pad_id, cfg.prenet_depth) == (50, 16, 1, 0)
  assert cfg.decoder.groups == 1 and cfg.decoder.projection_layers == 2
  assert not cfg.decoder.residual  # text's released decoder has none (a config default here)
  assert "input_norm" not in imported.params["encoder"]["blocks"]  # fairseq text has no such norm
  tokens = np.array([[0, 5, 9, 13, 2], [0, 7, 7, 40, 2]])

  def encode(model, t):
    x, padding = model.embed(t, jnp.zeros(t.shape, bool), train=False)
    out, _ = model.encode(x, padding, train=False)
    return out, model.decoder(out, padding)

  out, decoded = _apply(imported, encode, jnp.asarray(tokens))
  m = "modality_encoders.TEXT."
  positions = 2 + np.arange(5)  # fairseq: pad + 1 + index for unpadded tokens
  x = s[f"{m}local_encoder.embed_tokens.weight"][tokens]
  x = x + s[f"{m}local_encoder.embed_positions.weight"][positions]
  e = f"{m}local_encoder.layernorm_embedding"
  x = _ln(x, s[f"{e}.weight"], s[f"{e}.bias"])
  for i in range(TEXT["layers"]):
    x = _alt_block(x, s, f"blocks.{i}", 1e-5)
  np.testing.assert_allclose(out, x, atol=1e-4)
  np.testing.assert_allclose(decoded[1], _decode(x[1], s, m, False), atol=1e-4)


def test_audio_tensors_land_in_our_tree():
  s = fairseq_audio()
  imported = fairseq_v2.from_fairseq(s)
  cfg, p = imported.model_cfg, imported.params
  assert (cfg.conv_dim, cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups) == (
    16,
    2,
    5,
    4,
  )
  assert cfg.num_heads == H  # from the per-head ALiBi scales (no config given)
  m = "modality_encoders.AUDIO."
  expect = {
    "frontend/feature_extractor/conv_0/kernel": s[
      f"{m}local_encoder.conv_layers.0.0.weight"
    ].transpose(2, 1, 0),
    "frontend/feature_extractor/norm_6/scale": s[f"{m}local_encoder.conv_layers.6.2.1.weight"],
    "frontend/feature_norm/bias": s[f"{m}project_features.1.bias"],
    "frontend/projection/kernel": s[f"{m}project_features.2.weight"].T,
    "encoder/relative_positions/conv_1/kernel": s[
      f"{m}relative_positional_encoder.2.0.weight"
    ].transpose(2, 1, 0),
    "encoder/relative_positions/conv_0/bias": s[f"{m}relative_positional_encoder.1.0.bias"],
    "encoder/alibi_scale/alibi_scale": s[f"{m}alibi_scale"],
    "encoder/blocks/input_norm/scale": s[f"{m}context_encoder.norm.weight"],
    "encoder/blocks/layer_01/ffn_norm/bias": s["blocks.1.norm2.bias"],
    "decoder/conv_1/kernel": s[f"{m}decoder.blocks.1.0.weight"].transpose(2, 1, 0),
    "decoder/proj/kernel": s[f"{m}decoder.proj.weight"].T,
  }
  for path, value in expect.items():
    np.testing.assert_array_equal(_leaf(p, path), value, err_msg=path)
  # The fused qkv: output unit s·D + h·Dh + d is (q, k, v)[s], head h, dim d.
  qkv = _leaf(p, "encoder/blocks/layer_00/attention/qkv/kernel")  # [D, 3, H, Dh]
  key_head_2 = s["blocks.0.attn.qkv.weight"][D + 2 * (D // H) : D + 3 * (D // H)]
  np.testing.assert_array_equal(qkv[:, 1, 2, :], key_head_2.T)
  assert jax.tree.leaves(imported.params) and imported.teacher is None


def test_older_four_dimensional_alibi_scales_are_upgraded():
  s = fairseq_audio()
  m = "modality_encoders.AUDIO."
  s[f"{m}alibi_scale"] = s[f"{m}alibi_scale"][0]  # [1, H, 1, 1], as fairseq's upgrade expects
  imported = fairseq_v2.from_fairseq(s)
  assert _leaf(imported.params, "encoder/alibi_scale/alibi_scale").shape == (1, 1, H, 1, 1)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_ema_teacher_lands_on_the_emad_parts(modality):
  s = {"audio": fairseq_audio, "image": fairseq_image, "text": fairseq_text}[modality]()
  ema = _ema_of(s, modality)
  imported = fairseq_v2.from_fairseq({**s, "_ema": ema}, CFG)
  top = {path[0] for path in imported.teacher}
  assert (
    top == {"audio": {"encoder"}, "image": {"frontend", "encoder"}, "text": {"encoder"}}[modality]
  )
  layer = f"layer_{imported.model_cfg.prenet_depth:02d}"  # the first main block
  student = imported.params["encoder"]["blocks"][layer]["fc2"]["kernel"]
  teacher = imported.teacher[("encoder", "blocks", layer, "fc2", "kernel")]
  np.testing.assert_allclose(teacher - np.asarray(student), 0.01, atol=1e-6)
  assert any(line.startswith("_ema") for line in imported.dropped)


def test_fine_tuned_speech_ctc():
  s = fairseq_audio()
  encoder = {k: v for k, v in s.items() if ".decoder." not in k}  # remove_pretraining_modules
  state = {f"w2v_encoder.w2v_model.{k}": v for k, v in encoder.items()}
  _linear(state, "w2v_encoder.proj", 32, D)
  cfg = {"final_dropout": 0.1, "w2v_args": {"model": {"num_heads": H, "norm_eps": 1e-5}}}
  imported = fairseq_v2.from_fairseq(state, cfg)
  assert imported.head_cfg.to_dict() == dict(task="ctc", num_outputs=32, dropout=0.1)
  np.testing.assert_array_equal(
    _leaf(imported.params, "head/proj/kernel"), state["w2v_encoder.proj.weight"].T
  )
  np.testing.assert_array_equal(
    _leaf(imported.params, "encoder/blocks/layer_01/fc1/bias"),
    state["w2v_encoder.w2v_model.blocks.1.mlp.fc1.bias"],
  )
  assert "decoder" not in imported.params and imported.params["mask_emb"].shape == (D,)


def test_fine_tuned_image_classifier_and_its_refusals():
  s = fairseq_image()
  encoder = {k: v for k, v in s.items() if ".decoder." not in k}
  state = {f"model.{k}": v for k, v in encoder.items()}
  _norm(state, "fc_norm", D)
  _linear(state, "head", 10, D)
  imported = fairseq_v2.from_fairseq(state, {"prediction_mode": "MEAN_POOLING", **CFG})
  assert imported.head_cfg.task == "classify" and imported.head_cfg.num_outputs == 10
  np.testing.assert_array_equal(_leaf(imported.params, "head/norm/scale"), state["fc_norm.weight"])
  with pytest.raises(common.ConversionError, match="CLS_TOKEN"):
    fairseq_v2.from_fairseq(state, {"prediction_mode": "CLS_TOKEN", **CFG})


def test_fine_tuned_text_classifier():
  s = fairseq_text()
  state = {f"model.{k}": v for k, v in s.items() if ".decoder." not in k}
  _linear(state, "classification_heads.sentence_classification_head.dense", D, D)
  _linear(state, "classification_heads.sentence_classification_head.out_proj", 1, D)
  imported = fairseq_v2.from_fairseq(state, CFG)
  assert imported.head_cfg.task == "regress"
  np.testing.assert_array_equal(
    _leaf(imported.params, "head/out/bias"),
    state["classification_heads.sentence_classification_head.out_proj.bias"],
  )


def test_every_bad_key_is_listed():
  s = fairseq_image()
  m = "modality_encoders.IMAGE."
  s["blocks.0.attn.logit_scale"] = np.zeros(1)  # cosine attention: not ours
  del s["blocks.1.mlp.fc2.bias"]
  s[f"{m}extra_tokens"] = np.zeros((1, 2, D))
  with pytest.raises(common.ConversionError) as error:
    fairseq_v2.from_fairseq(s, CFG)
  message = str(error.value)
  for part in (
    "unknown keys (1): blocks.0.attn.logit_scale",
    "missing keys (1): blocks.1.mlp.fc2.bias",
    "extra_tokens: got (1, 2, 32)",
  ):
    assert part in message


def test_other_positions_and_several_modalities_are_refused():
  s = fairseq_image()
  s["modality_encoders.IMAGE.fixed_positional_encoder.positions"] += 1.0
  with pytest.raises(common.ConversionError, match="sin-cos"):
    fairseq_v2.from_fairseq(s, CFG)
  with pytest.raises(common.ConversionError, match="one data2vec 2.0 modality"):
    fairseq_v2.from_fairseq({**fairseq_image(), **fairseq_text()})
  with pytest.raises(common.ConversionError, match="fairseq_v2"):
    fairseq_v1.to_hf(fairseq_audio())


def test_imported_image_checkpoint_resumes_pretraining(tmp_path, monkeypatch):
  """A 2.0 image file with its `_ema` -> work directory (version 2, the teacher from `_ema`) ->
  pretraining continues with its own config (configs/workdir.py) on the embedded digits."""
  s = fairseq_image()
  ckpt = {"model": {**s, "_ema": _ema_of(s, "image")}, "cfg": {"model": {"num_heads": H}}}
  monkeypatch.setattr(files, "load_torch_file", lambda path: ckpt)
  src = tmp_path / "base_imagenet.pt"
  src.write_bytes(b"")
  out = tmp_path / "ours"
  report = workdir.import_checkpoint(src, out)
  assert (report["source_kind"], report["version"], report["mode"]) == ("fairseq-v2", 2, "pretrain")
  assert report["teacher"].startswith("the checkpoint's EMA")
  config = workdir_config.get_config(str(out))
  assert config.version == 2 and config.targets.top_k == 2  # the main blocks (no prenet)
  with config.unlocked():
    config.loop.update(total_steps=2, progress_bar=False)
    config.probe.enabled = False
    config.input.batch_size = 4
    config.masking.num_clones = 2
  train.train_and_evaluate(config, out)
  manager = checkpoint.Checkpointer(out, config).manager
  state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  after = np.asarray(state["params"]["encoder"]["blocks"]["layer_01"]["fc1"]["kernel"])
  assert 0 < np.max(np.abs(after - s["blocks.0.mlp.fc1.weight"].T)) < 0.1
  teacher = np.asarray(state["teacher"]["encoder"]["extra_tokens"])
  np.testing.assert_allclose(
    teacher, s["modality_encoders.IMAGE.extra_tokens"][0] + 0.01, atol=1e-3
  )


def test_imported_image_classifier_is_a_version_2_fine_tuning_run(tmp_path, monkeypatch):
  """A fine-tuned 2.0 image file -> a fine-tuning work directory (configs/image_cls.py with the
  2.0 encoder) whose features `extract` reads: the last layer is fairseq's encoder output."""
  s = fairseq_image()
  state = {f"model.{k}": v for k, v in s.items() if ".decoder." not in k}
  _norm(state, "fc_norm", D)
  _linear(state, "head", 10, D)
  ckpt = {"model": state, "cfg": {"model": {"pretrained_model_args": {"model": CFG}}}}
  monkeypatch.setattr(files, "load_torch_file", lambda path: ckpt)
  src = tmp_path / "base_imagenet_ft.pt"
  src.write_bytes(b"")
  out = tmp_path / "ours"
  report = workdir.import_checkpoint(src, out)
  assert (report["mode"], report["version"], report["head"]["num_outputs"]) == ("finetune", 2, 10)
  config = workdir_config.get_config(str(out))
  assert config.version == 2 and config.model.prenet_depth == 1 and config.model.norm_eps == 1e-6

  images = RNG.normal(size=(1, 32, 32, 3)).astype(np.float32)
  features = extract.load_extractor(out)(images)
  m = "modality_encoders.IMAGE."
  patches = images.reshape(1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 5, 2, 4).reshape(1, 64, 48)
  x = patches @ s[f"{m}local_encoder.proj.weight"].reshape(D, -1).T
  x = x + s[f"{m}local_encoder.proj.bias"] + s[f"{m}fixed_positional_encoder.positions"]
  x = np.concatenate([s[f"{m}extra_tokens"], x], axis=1)
  x = _ln(x, s[f"{m}context_encoder.norm.weight"], s[f"{m}context_encoder.norm.bias"], 1e-6)
  for name in (f"{m}context_encoder.blocks.0", "blocks.0", "blocks.1"):
    x = _alt_block(x, s, name, 1e-6)
  np.testing.assert_allclose(np.asarray(features.layers[-1][0]), x[0, 1:], atol=1e-4)
