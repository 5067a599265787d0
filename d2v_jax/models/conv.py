"""Same-length grouped convolutions over channels-last inputs: the speech positional conv (spec
§1.1 speech, "conv_pos") and data2vec 2.0's decoder layers (spec §2.1.8) are both stacks of
[grouped conv -> LayerNorm without affine -> GELU].

`GroupedConv` holds `nn.Conv`'s parameters (`kernel` [k, ..., C_in/G, C_out], `bias` [C_out]) but
on CPU computes the convolution as the k^n shifted windows of the padded input and one einsum over
the groups. XLA's CPU backward pass of a grouped `conv_general_dilated` is far slower than that:
~25x on the tiny 2-D decoder (12.9 s against 0.5 s per gradient), 6.6x on speech base's positional
conv (572 ms against 86 ms for the forward and backward of one 2-second clip; bench/README.md).
Elsewhere `lax`'s convolution runs, which accelerators implement natively; both compute the same
thing (tested).
"""

import itertools

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2v_jax.models.transformer import gelu, torch_default_init


class GroupedConv(nn.Module):
  """A stride-1 grouped convolution over the middle axes of `x` [B, *S, C_in] -> [B, *S', C_out]."""

  features: int
  kernel: int
  groups: int
  padding: tuple[int, int]  # (before, after) on every spatial axis
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    ndim, channels, k, g = x.ndim - 2, x.shape[-1], self.kernel, self.groups
    kernel = self.param(
      "kernel", torch_default_init, (k,) * ndim + (channels // g, self.features), jnp.float32
    )
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if jax.default_backend() != "cpu":
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * ndim,
        padding=[self.padding] * ndim,
        dimension_numbers=jax.lax.conv_dimension_numbers(
          x.shape,
          kernel.shape,
          ("N" + "HWD"[:ndim] + "C", "HWD"[:ndim] + "IO", "N" + "HWD"[:ndim] + "C"),
        ),
        feature_group_count=g,
      )
      return y + bias.astype(self.dtype)
    padded = jnp.pad(x, [(0, 0)] + [self.padding] * ndim + [(0, 0)])
    spatial = tuple(n - k + 1 for n in padded.shape[1:-1])  # the output's
    windows = [
      padded[(slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial)), slice(None))]
      for offset in itertools.product(range(k), repeat=ndim)
    ]  # k^n × [B, *S', C_in], in the kernel's row-major offset order
    stacked = jnp.stack(windows, axis=-2).reshape(
      x.shape[0], *spatial, k**ndim, g, channels // g
    )  # [B, *S', k^n, G, C_in/G]
    weights = kernel.reshape(k**ndim, channels // g, g, self.features // g)  # [k^n, Ci, G, Co]
    y = jnp.einsum("...kgc,kcgo->...go", stacked, weights)  # [B, *S', G, Co]
    return y.reshape(x.shape[0], *spatial, self.features) + bias.astype(self.dtype)


def same_conv_layer(x, features, kernel, groups, dtype, name, bias_init=nn.initializers.zeros):
  """Grouped conv (same length) -> LayerNorm without affine -> GELU on `x` [B, *S, C].

  fairseq pads k//2 on both sides, then SamePad drops the last step (and SamePad2d the last row
  and column) when k is even: the same as padding (k//2, (k−1)//2).
  """
  padding = (kernel // 2, (kernel - 1) // 2)
  x = GroupedConv(features, kernel, groups, padding, bias_init, dtype=dtype, name=name)(x)
  x = nn.LayerNorm(epsilon=1e-5, use_bias=False, use_scale=False, dtype=dtype)(x)
  return gelu(x)
