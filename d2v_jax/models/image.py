"""Image front end and encoder of data2vec 1.0 (spec §1.1, vision; the BEiT ViT layout).

- `PatchEmbed`: a p×p convolution with stride p: [B, H, W, C] -> [B, N, D] patch tokens,
  N = (H/p)·(W/p) in row-major order (the order masks and targets use).
- `ImageEncoder`: prepend a learned CLS token, then pre-LN blocks with LayerScale and stochastic
  depth whose attention adds ONE relative position bias shared by every block (or, for
  fine-tuning, one per block), then a final LayerNorm. There is no absolute position embedding.

The encoder hides its CLS token from the caller: outputs and per-block sublayer outputs are
returned for the N patch positions only, aligned with the tokens (and mask) it was given, which is
what targets and predictions use (spec §1.3: CLS dropped). The final CLS output is `aux["cls"]`.

Relative position bias (BEiT `RelativePositionBias`): a table of (2h−1)(2w−1) + 3 rows × heads,
one row per 2-D offset between patches plus three for cls→patch, patch→cls and cls→cls. The table
follows the grid, so resolution and patch size are free config values.
"""

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2v_jax.models import transformer


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """int[N+1, N+1]: the bias-table row of each (query, key) pair, CLS at position 0."""
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)  # [2, N]
  delta = coords[:, :, None] - coords[:, None, :]  # [2, N, N], in (-h, h) x (-w, w)
  patch_index = (delta[0] + h - 1) * (2 * w - 1) + (delta[1] + w - 1)  # [N, N]
  num_offsets = (2 * h - 1) * (2 * w - 1)
  index = np.empty((h * w + 1, h * w + 1), np.int32)
  index[1:, 1:] = patch_index
  index[0, :] = num_offsets  # cls -> patch
  index[:, 0] = num_offsets + 1  # patch -> cls
  index[0, 0] = num_offsets + 2  # cls -> cls
  return index


def num_relative_positions(grid: tuple[int, int]) -> int:
  """Rows of the relative position bias table: 732 for a 14×14 grid."""
  h, w = grid
  return (2 * h - 1) * (2 * w - 1) + 3


class RelativePositionBias(nn.Module):
  """The bias table -> an additive attention bias.

  `num_tables=0`: one table [rows, H] shared by every block -> [H, N+1, N+1] (BEiT pretraining,
  data2vec's released pretrained models). `num_tables=L`: one table per block, [L, rows, H] ->
  [L, H, N+1, N+1] (BEiT fine-tuning, which starts each block's table from the shared one).
  """

  grid: tuple[int, int]
  num_heads: int
  num_tables: int = 0

  @nn.compact
  def __call__(self):
    shape = (num_relative_positions(self.grid), self.num_heads)
    if self.num_tables:
      shape = (self.num_tables, *shape)
    table = self.param("table", nn.initializers.zeros, shape)
    index = relative_position_index(self.grid)  # static: a gather with constant indices
    bias = table[..., index, :]  # [(L,) N+1, N+1, H]
    return jnp.moveaxis(bias, -1, -3)  # [(L,) H, N+1, N+1]


class PatchEmbed(nn.Module):
  """Non-overlapping p×p patches -> D-dim tokens (a strided convolution)."""

  dim: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = transformer.torch_default_init  # BEiT's: torch's

  @nn.compact
  def __call__(self, images):
    # images: [B, H, W, C] -> [B, H/p, W/p, D]
    p = self.patch_size
    x = nn.Conv(
      self.dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      name="projection",
    )(images.astype(self.dtype))
    return x.reshape(x.shape[0], -1, self.dim)  # [B, N, D], row-major patches


def patch_grid(image_size: int, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of patches; the image side must be a multiple of the patch size."""
  if image_size % patch_size:
    raise ValueError(
      f"config.model.image_size={image_size} is not a multiple of "
      f"config.model.patch_size={patch_size}"
    )
  return image_size // patch_size, image_size // patch_size


def sincos_2d(dim: int, grid: int | tuple[int, int]) -> np.ndarray:
  """MAE's `get_2d_sincos_pos_embed` without a CLS row: float32 [h·w, dim], a constant.

  Patch p = i·w + j (row-major). As in MAE, the first dim/2 channels encode the column j and the
  last dim/2 the row i (MAE names them the other way round but meshgrids w first); each half is
  [sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(−k/(dim/4)), k < dim/4. Computed in float64.
  """
  if dim % 4:
    raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
  h, w = (grid, grid) if isinstance(grid, int) else grid
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [dim/4]
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w] each

  def one_axis(pos):  # [h·w] -> [h·w, dim/2]
    angle = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


class ImageFrontend(nn.Module):
  """Images [B, H, W, C] -> (patch tokens [B, N, D], padding mask [B, N], all False).

  data2vec 2.0 (spec §2.3) adds the fixed 2-D sin-cos positions here (`fixed_positions`) and
  initialises the projection Xavier-uniform (`kernel_init`); v1 (BEiT) has neither.
  """

  dim: int
  image_size: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = transformer.torch_default_init
  fixed_positions: bool = False

  @nn.compact
  def __call__(self, images, padding_mask=None, *, train: bool):
    del padding_mask, train  # images are never padded; the signature is the model's contract
    expected = (self.image_size, self.image_size)
    if images.ndim != 4 or tuple(images.shape[1:3]) != expected:
      raise ValueError(
        f"Expected images [B, {self.image_size}, {self.image_size}, C], got {images.shape}"
      )
    tokens = PatchEmbed(
      self.dim, self.patch_size, dtype=self.dtype, kernel_init=self.kernel_init, name="patch_embed"
    )(images)  # [B, N, D]
    if self.fixed_positions:  # a constant, not a parameter
      grid = patch_grid(self.image_size, self.patch_size)
      tokens = tokens + jnp.asarray(sincos_2d(self.dim, grid), tokens.dtype)
    return tokens, jnp.zeros(tokens.shape[:2], bool)


class ImageEncoder(nn.Module):
  """Patch tokens [B, N, D] -> (output [B, N, D], aux), with a CLS token inside.

  aux = {"layers": [{"ffn", "block"} per block, patch positions only], "cls": [B, D] final CLS}.
  """

  grid: tuple[int, int]
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 0.1
  layer_norm_eps: float = 1e-6
  final_norm: bool = True  # False: BEiT's mean-pooling classifier (it normalises after pooling)
  per_layer_bias: bool = False  # one relative position table per block (BEiT fine-tuning)
  execution: transformer.Execution = transformer.Execution()  # remat, fused attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    batch, num_patches, dim = x.shape
    if num_patches != self.grid[0] * self.grid[1]:
      raise ValueError(f"Expected {self.grid[0]}x{self.grid[1]} patches, got {num_patches}")
    cls = self.param("cls_token", transformer.bert_init, (dim,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, dim)), x], axis=1)
    padding_mask = jnp.pad(padding_mask, ((0, 0), (1, 0)))  # [B, 1+N]: CLS is never padding
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    bias = RelativePositionBias(
      self.grid, self.num_heads, self.num_layers if self.per_layer_bias else 0, name="rel_pos_bias"
    )()
    x, layers = transformer.Encoder(
      self.num_layers,
      self.num_heads,
      self.mlp_dim,
      pre_norm=True,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      drop_path_rate=self.drop_path_rate,
      layer_scale_init=self.layer_scale_init,
      key_bias=False,
      rescale_init=True,
      layer_norm_eps=self.layer_norm_eps,
      execution=self.execution,
      dtype=self.dtype,
      name="blocks",
    )(x, padding_mask, bias, train=train)
    if self.final_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_norm")(x)
    layers = [{name: y[:, 1:] for name, y in layer.items()} for layer in layers]
    return x[:, 1:], {"layers": layers, "cls": x[:, 0]}
