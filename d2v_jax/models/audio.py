"""Speech front end and encoder of data2vec 1.0 (spec §1.1, audio; wav2vec 2.0 layout).

- `FeatureExtractor`: 7 Conv1d (no bias), kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2), each
  followed by a LayerNorm over channels and GELU: 16 kHz -> 50 Hz, receptive field 400 samples.
- `AudioFrontend`: feature extractor -> LayerNorm -> Linear to the model width. Its output is what
  the student masks and what the teacher encodes unmasked (the CNN and projection are shared).
- `AudioEncoder`: add a 5-layer grouped convolutional positional encoding (padded frames zeroed
  before each layer), LayerNorm, dropout, then the post-LN transformer stack.

Padding is carried exactly: frame t is valid iff it lies inside `output_lengths(valid_samples)`,
and the receptive field of every valid frame lies inside the valid samples, so padded and unpadded
inputs give the same features at valid frames. The positional convolution zeroes padded frames
before every layer, so padding cannot leak through its stacked receptive fields either; this
equals fairseq and HF exactly on unpadded input, and differs from them (by fixing HF#25621)
only where they let padding change valid frames.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2v_jax.models import conv, transformer

CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def output_lengths(lengths, kernels=CONV_KERNELS, strides=CONV_STRIDES):
  """Frames produced by the conv stack for inputs of `lengths` samples: ⌊(L−k)/s⌋+1 per layer.

  Works on Python ints, numpy and jax arrays; lengths shorter than the receptive field give 0.
  """
  xp = jnp if not isinstance(lengths, int | np.ndarray | np.integer) else np
  for k, s in zip(kernels, strides, strict=True):
    lengths = xp.maximum((lengths - k) // s + 1, 0)
  return lengths


def frame_padding_mask(padding_mask, kernels=CONV_KERNELS, strides=CONV_STRIDES):
  """Sample-level padding mask [B, T] (True = pad) -> frame-level padding mask [B, T']."""
  num_frames = output_lengths(padding_mask.shape[1], kernels, strides)
  valid = output_lengths(jnp.sum(~padding_mask, axis=1), kernels, strides)  # [B]
  return jnp.arange(num_frames)[None, :] >= valid[:, None]


class FeatureExtractor(nn.Module):
  """Raw waveform [B, T] -> conv features [B, T', C]."""

  conv_dim: int = 512
  kernels: Sequence[int] = CONV_KERNELS
  strides: Sequence[int] = CONV_STRIDES
  conv_bias: bool = False
  remat: str = "none"  # transformer.REMAT_POLICIES: recompute each layer in the backward pass
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, audio):
    x = audio[..., None].astype(self.dtype)  # [B, T, 1]
    for j, (k, s) in enumerate(zip(self.kernels, self.strides, strict=True)):

      def layer(module, x, j=j, k=k, s=s):
        del module  # the submodules below join it by name, as without remat
        x = nn.Conv(
          self.conv_dim,
          (k,),
          strides=(s,),
          padding="VALID",
          use_bias=self.conv_bias,
          kernel_init=nn.initializers.kaiming_normal(),
          dtype=self.dtype,
          name=f"conv_{j}",
        )(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"norm_{j}")(x)
        return transformer.gelu(x)

      if self.remat != "none":
        # The CNN's activations (512 channels at up to 3,200 frames a second) are most of a
        # speech step's memory; "full" keeps only each layer's input.
        layer = nn.remat(layer, policy=transformer.REMAT_POLICIES[self.remat])
      x = layer(self, x)
    return x  # [B, T', C]


class AudioFrontend(nn.Module):
  """Waveform -> projected frame features and the frame padding mask."""

  dim: int
  conv_dim: int = 512
  conv_bias: bool = False
  execution: transformer.Execution = transformer.Execution()  # remat covers the CNN too
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, padding_mask, *, train: bool):
    del train  # no dropout here: data2vec's feature-projection dropout is 0
    features = FeatureExtractor(
      self.conv_dim,
      conv_bias=self.conv_bias,
      remat=self.execution.remat,
      dtype=self.dtype,
      name="feature_extractor",
    )(audio)
    features = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="feature_norm")(features)
    x = nn.Dense(
      self.dim, kernel_init=transformer.torch_default_init, dtype=self.dtype, name="projection"
    )(features)  # [B, T', D]
    return x, frame_padding_mask(padding_mask)


class ConvPositionalEncoding(nn.Module):
  """`depth` × [grouped Conv1d (same length) -> LayerNorm without affine -> GELU]
  (`conv.same_conv_layer`)."""

  depth: int = 5
  kernel_size: int = 19
  groups: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None):
    dim = x.shape[-1]
    for j in range(self.depth):
      if padding_mask is not None:
        # Padded frames must read as zeros at every layer, as the edge of an unpadded clip does;
        # zeroing only the input (fairseq, HF) lets layer j's output at padded frames leak into
        # valid frames from layer j + 1 on: up to 5 × 9 frames deep (HF issue 25621).
        x = jnp.where(padding_mask[..., None], 0, x)
      # Bias init zeros, as fairseq's and HF's pos_conv.
      x = conv.same_conv_layer(x, dim, self.kernel_size, self.groups, self.dtype, f"conv_{j}")
    return x


class AudioEncoder(nn.Module):
  """Frame features [B, T', D] -> (output [B, T', D], aux).

  aux = {"input": the first block's input, "layers": [{"ffn", "block"} per block]}.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  pos_conv_depth: int = 5
  pos_conv_kernel: int = 19
  pos_conv_groups: int = 16
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  execution: transformer.Execution = transformer.Execution()  # remat, fused attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    x = jnp.where(padding_mask[..., None], 0, x)
    x = x + ConvPositionalEncoding(
      self.pos_conv_depth,
      self.pos_conv_kernel,
      self.pos_conv_groups,
      dtype=self.dtype,
      name="pos_conv",
    )(x, padding_mask)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="layer_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    encoder_input = x
    x, layers = transformer.Encoder(
      self.num_layers,
      self.num_heads,
      self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
      layerdrop=self.layerdrop,
      execution=self.execution,
      dtype=self.dtype,
      name="blocks",
    )(x, padding_mask, train=train)
    return x, {"input": encoder_input, "layers": layers}
