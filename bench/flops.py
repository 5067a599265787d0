"""Analytic model FLOPs of one pretraining step (issue 7, item 1), from the config alone.

Only matmuls and convolutions are counted, 2 FLOPs per multiply-add (layer norms, softmax, GELU,
the loss, Adam and the EMA are left out: they are the gap to XLA's count). Per component, for
`rows` sequences of `t` tokens of width D, FFN width F, conv kernel k, groups G:

  transformer block   rows · (8·t·D² + 4·t²·D + 4·t·D·F)   (q, k, v, out; QKᵀ and PV; fc1, fc2)
  Linear d_in -> d_out  2 · rows · t · d_in · d_out
  conv (stride s)     2 · rows · t_out · k^dims · (C_in / G) · C_out

One step = 3 × the student's forward (forward + backward at twice the forward, the usual
convention) + 1 × the teacher's forward (eval mode, no gradient). What each side runs:

  v1 speech   student: CNN, projection, pos conv, blocks on T' frames, head D->D (B rows);
              teacher: pos conv and blocks on the student's features (the CNN is shared).
  v1 images   student: patch embedding, blocks on N+1 tokens (CLS), head D->D on N;
              teacher: patch embedding and blocks (the whole model is EMA'd).
  v1 text     student: blocks on L tokens, head D->2D->D; teacher: blocks (embeddings: gathers).
  v2 (all)    the student embeds B samples once, then B·M clones encode their K kept tokens
              (+1 CLS for images; speech adds the pos conv on all T' frames of every clone) and the
              conv decoder predicts all N positions; the teacher encodes B samples unmasked.
"""

import dataclasses

import ml_collections

from d2v_jax import masking_v2
from d2v_jax.models import audio, data2vec, image


@dataclasses.dataclass(frozen=True)
class StepFlops:
  student_forward: float  # FLOPs of the student's forward pass for the whole batch
  teacher_forward: float

  @property
  def total(self) -> float:
    return 3 * self.student_forward + self.teacher_forward


def linear(rows: int, t: int, d_in: int, d_out: int) -> float:
  return 2.0 * rows * t * d_in * d_out


def blocks(rows: int, t: int, sizes: dict) -> float:
  """`num_layers` transformer blocks on `rows` sequences of `t` tokens."""
  dim, mlp = sizes["dim"], sizes["mlp_dim"]
  per_block = 8.0 * t * dim**2 + 4.0 * t**2 * dim + 4.0 * t * dim * mlp
  return rows * sizes["num_layers"] * per_block


def conv(rows: int, t_out: int, kernel_volume: int, c_in: int, c_out: int, groups: int = 1):
  return 2.0 * rows * t_out * kernel_volume * (c_in // groups) * c_out


def audio_cnn(rows: int, samples: int, sizes: dict) -> float:
  """wav2vec 2.0's 7-layer CNN and the feature projection to D."""
  total, c_in, length = 0.0, 1, samples
  channels = sizes["conv_dim"]
  for k, s in zip(audio.CONV_KERNELS, audio.CONV_STRIDES, strict=True):
    length = (length - k) // s + 1
    total += conv(rows, length, k, c_in, channels)
    c_in = channels
  return total + linear(rows, length, channels, sizes["dim"])


def pos_conv(rows: int, frames: int, sizes: dict) -> float:
  dim = sizes["dim"]
  layer = conv(rows, frames, sizes["pos_conv_kernel"], dim, dim, sizes["pos_conv_groups"])
  return sizes["pos_conv_depth"] * layer


def decoder(rows: int, positions: int, dim: int, d: ml_collections.ConfigDict, dims: int):
  """data2vec 2.0's conv decoder (`dims`-D kernels) and its projection back to D."""
  total, c_in = 0.0, dim
  for _ in range(d.layers):
    total += conv(rows, positions, d.kernel**dims, c_in, d.dim, d.groups)
    c_in = d.dim
  widths = [d.dim] + ([2 * d.dim] * (d.get("projection_layers", 1) - 1)) + [dim]
  return total + sum(linear(rows, positions, a, b) for a, b in zip(widths[:-1], widths[1:]))


def tokens_of(config, length: int) -> int:
  """Encoder positions of one input of `length` samples (audio) or tokens (text)."""
  if config.modality == "audio":
    return int(audio.output_lengths(length))
  if config.modality == "image":
    rows, cols = image.patch_grid(config.model.image_size, config.model.patch_size)
    return rows * cols
  return length


def step_flops(config: ml_collections.ConfigDict, batch: int, length: int = 0) -> StepFlops:
  """Model FLOPs of one step on `batch` inputs of `length` samples/tokens (ignored for images)."""
  sizes = data2vec.model_sizes(config.modality, config.model)
  n = tokens_of(config, length)
  if config.version == 1:
    return _v1(config, sizes, batch, length, n)
  return _v2(config, sizes, batch, length, n)


def _frontend(config, sizes, batch: int, length: int) -> float:
  if config.modality == "audio":
    return audio_cnn(batch, length, sizes)
  if config.modality == "image":
    n = tokens_of(config, length)
    return linear(batch, n, sizes["patch_size"] ** 2 * 3, sizes["dim"])
  return 0.0  # text: embedding gathers


def _v1(config, sizes, batch: int, length: int, n: int) -> StepFlops:
  dim = sizes["dim"]
  cls = 1 if config.modality == "image" else 0
  encoder = blocks(batch, n + cls, sizes)
  if config.modality == "audio":
    encoder += pos_conv(batch, n, sizes)
  if config.modality == "text":
    head = linear(batch, n, dim, 2 * dim) + linear(batch, n, 2 * dim, dim)
  else:
    head = linear(batch, n, dim, dim)
  frontend = _frontend(config, sizes, batch, length)
  teacher = encoder + (frontend if config.modality == "image" else 0.0)
  return StepFlops(frontend + encoder + head, teacher)


def num_kept(config, n: int) -> int:
  """K, the static count of tokens each clone keeps (masking_v2's)."""
  m = config.masking
  inverse = config.modality == "text" or bool(m.get("inverse", False))
  return masking_v2.num_kept(n, m.ratio, inverse=inverse)


def _v2(config, sizes, batch: int, length: int, n: int) -> StepFlops:
  clones = batch * config.masking.num_clones
  cls = 1 if config.modality == "image" else 0
  student = _frontend(config, sizes, batch, length)
  student += blocks(clones, num_kept(config, n) + cls, sizes)
  dims = 2 if config.modality == "image" else 1
  student += decoder(clones, n, sizes["dim"], config.model.decoder, dims)
  teacher = blocks(batch, n + cls, sizes)
  if config.modality == "audio":
    student += pos_conv(clones, n, sizes)
    teacher += pos_conv(batch, n, sizes)
  if config.modality == "image":
    teacher += _frontend(config, sizes, batch, length)
  return StepFlops(student, teacher)
