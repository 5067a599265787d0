"""Transformer blocks and encoder stack shared by every modality (spec §1.1, "Transformer blocks").

One `Block` covers both layouts of data2vec 1.0:

  post-LN (speech, text; wav2vec 2.0 / RoBERTa):
    x = attention_norm(x + dropout(attention(x)))
    f = fc2(dropout(gelu(fc1(x))))            # the FFN output: v1 speech/text targets
    x = ffn_norm(x + dropout(f))              # the end-of-block output

  pre-LN (vision; BEiT), with LayerScale γ and stochastic depth:
    x = x + drop_path(γ1 · attention(attention_norm(x), relative_position_bias))
    f = fc2(gelu(fc1(ffn_norm(x))))           # the FFN output, before γ2
    x = x + drop_path(γ2 · f)                 # the end-of-block output: v1 vision targets

Each block returns `(x, {"ffn": f, "block": x})`, so target construction (spec §1.3) picks a
sublayer without touching the model. Parameter names: `layer_00/attention/query`, `.../fc1`.

`Execution` says how the blocks of every encoder (v1 and v2) run without changing what they
compute (issue 7): rematerialisation (`nn.remat` with a policy) and the attention kernel
(`attend`, shared with `v2_layers.AltAttention`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

# fairseq and HF use exact (erf) GELU.
gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731

# fairseq's init_bert_params and BEiT's init: every Linear is N(0, 0.02) with zero bias (BEiT's
# truncation at ±2 absolute is 100σ away, so it never bites).
INIT_STD = 0.02
bert_init = nn.initializers.normal(INIT_STD)

# PyTorch's default Conv/Linear initialisation (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Additive attention bias for padded keys; finite so fully padded rows stay NaN-free.
_NEG_INF = -1e9

# `config.model.remat` -> what the backward pass keeps of a block's forward pass. "full": only
# the block's inputs (everything else is recomputed); "dots": also the outputs of the weight
# matmuls (the attention scores, softmax, GELU and LayerNorms are recomputed: the attention
# einsums have batch dimensions, so this policy does not save them).
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the blocks run; never what they compute (same parameters, same outputs).

  remat: "none" keeps every activation for the backward pass; else a `REMAT_POLICIES` key.
  fused_attention: attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on
    GPUs for bf16/fp16, XLA's elsewhere) wherever attention dropout is off (rate 0, or not
    training: the teacher, evaluation). With dropout on, the explicit path runs: the fused
    kernels have no attention dropout.
  """

  remat: str = "none"
  fused_attention: bool = False


def execution_from_config(model_cfg) -> Execution:
  """`Execution` from `config.model.remat` and `config.model.fused_attention` (both optional)."""
  remat = model_cfg.get("remat", "none")
  if remat != "none" and remat not in REMAT_POLICIES:
    raise ValueError(
      f"config.model.remat={remat!r}: use 'none', {', '.join(map(repr, REMAT_POLICIES))}"
    )
  return Execution(remat, bool(model_cfg.get("fused_attention", False)))


def block_class(cls: type[nn.Module], execution: Execution) -> type[nn.Module]:
  """`cls`, a block called as `(x, padding_mask, attention_bias, train)`, rematerialised as
  `execution.remat` says. `train` is static (argument 4, counting the module): dropout and
  LayerDrop branch on it in Python. Parameter names do not change."""
  if execution.remat == "none":
    return cls
  rematerialised = nn.remat(cls, policy=REMAT_POLICIES[execution.remat], static_argnums=(4,))

  class Checked(rematerialised):
    def __call__(self, x, padding_mask=None, attention_bias=None, train=None):
      check_train(train, cls)  # before nn.remat, whose error would not say what is missing
      return super().__call__(x, padding_mask, attention_bias, train)

  return Checked


def check_train(train, block: nn.Module | type[nn.Module]) -> None:
  """Blocks take `train` positionally (nn.remat marks it static by position) but still require
  it: a forgotten `train` would silently switch dropout off."""
  if train is None:
    name = (block if isinstance(block, type) else type(block)).__name__
    raise TypeError(f"{name} needs train=True or train=False")


def attention_weights(q, k, padding_mask=None, attention_bias=None, dtype=jnp.float32):
  """Softmax weights [B, H, Tq, Tk] of scaled queries and keys [B, T, H, Dh]: logits and softmax
  in float32, padded keys masked with a finite bias; `attention_bias` broadcasts to the logits."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, H, T, T]
  if attention_bias is not None:
    logits = logits + attention_bias.astype(jnp.float32)
  if padding_mask is not None:
    logits = jnp.where(padding_mask[:, None, None, :], _NEG_INF, logits)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def attend(q, k, v, padding_mask, attention_bias, *, dropout: float, train: bool, fused: bool):
  """Attention output [B, T, H, Dh] of scaled queries and keys/values [B, T, H, Dh].

  padding_mask: [B, T], True at padded keys; attention_bias: broadcastable to [B, H, T, T].
  Called from a module's compact method (the dropout on the weights is a submodule of it).
  """
  if fused and (dropout == 0 or not train):
    mask = None if padding_mask is None else ~padding_mask[:, None, None, :]  # [B, 1, 1, T]
    bias = None
    if attention_bias is not None:  # the API wants 4-D; cuDNN wants the queries' dtype
      bias = attention_bias.reshape((1,) * (4 - attention_bias.ndim) + attention_bias.shape)
      bias = bias.astype(q.dtype)
    # The queries are already scaled (fairseq and HF scale them before the product).
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=1.0)
  probs = attention_weights(q, k, padding_mask, attention_bias, q.dtype)  # [B, H, T, T]
  probs = nn.Dropout(dropout)(probs, deterministic=not train)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, T, H, Dh]


class MultiHeadAttention(nn.Module):
  """Self-attention with query/key/value/out projections.

  `key_bias=False` is BEiT's fused qkv with q and v biases only (the fused kernel split in
  thirds is exactly these three projections). `out_init` lets BEiT rescale the output layer.
  """

  num_heads: int
  dropout: float = 0.0
  key_bias: bool = True
  out_init: nn.initializers.Initializer = bert_init
  fused: bool = False  # `Execution.fused_attention`
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, *, train: bool):
    # x: [B, T, D]; padding_mask: [B, T], True at padded positions; attention_bias: [H, T, T].
    dim = x.shape[-1]
    head_dim = dim // self.num_heads

    def dense(name, use_bias=True):
      return nn.DenseGeneral(
        (self.num_heads, head_dim),
        use_bias=use_bias,
        kernel_init=bert_init,
        dtype=self.dtype,
        name=name,
      )

    q = dense("query")(x) * head_dim**-0.5  # [B, T, H, Dh]
    k = dense("key", self.key_bias)(x)
    v = dense("value")(x)
    out = attend(  # [B, T, H, Dh]
      q, k, v, padding_mask, attention_bias, dropout=self.dropout, train=train, fused=self.fused
    )
    return nn.DenseGeneral(
      dim, axis=(-2, -1), kernel_init=self.out_init, dtype=self.dtype, name="out"
    )(out)


class Block(nn.Module):
  """One transformer block, post-LN (`pre_norm=False`) or pre-LN with LayerScale (`True`).

  Attributes:
    layer_scale_init: γ's initial value (pre-LN only); 0 = no LayerScale.
    drop_path: probability of dropping the residual branches of a sample (stochastic depth).
    out_init: initialiser of the attention output and fc2 kernels (BEiT rescales them per depth).
  """

  num_heads: int
  mlp_dim: int
  pre_norm: bool = False
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  key_bias: bool = True
  layer_norm_eps: float = 1e-5
  out_init: nn.initializers.Initializer = bert_init
  fused_attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, train: bool | None = None):
    # `train` may be positional, so `block_class` can mark it static for nn.remat.
    check_train(train, self)
    dim = x.shape[-1]
    dropout = lambda rate, y: nn.Dropout(rate)(y, deterministic=not train)  # noqa: E731
    # timm's drop_path: the whole branch of a sample is dropped, survivors scaled by 1/(1-p).
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(  # noqa: E731
      y, deterministic=not train
    )
    attention_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="attention_norm")
    ffn_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ffn_norm")
    attention = MultiHeadAttention(
      self.num_heads,
      self.attention_dropout,
      self.key_bias,
      self.out_init,
      fused=self.fused_attention,
      dtype=self.dtype,
      name="attention",
    )

    def ffn(h):
      h = gelu(nn.Dense(self.mlp_dim, kernel_init=bert_init, dtype=self.dtype, name="fc1")(h))
      return nn.Dense(dim, kernel_init=self.out_init, dtype=self.dtype, name="fc2")(
        dropout(self.activation_dropout, h)
      )  # [B, T, D]

    def layer_scale(name, y):
      if not self.layer_scale_init:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (dim,))
      return gamma.astype(y.dtype) * y

    if self.pre_norm:
      a = attention(attention_norm(x), padding_mask, attention_bias, train=train)
      x = x + drop_path(layer_scale("attention_scale", dropout(self.dropout, a)))
      f = ffn(ffn_norm(x))
      x = x + drop_path(layer_scale("ffn_scale", dropout(self.dropout, f)))
    else:
      a = attention(x, padding_mask, attention_bias, train=train)
      x = attention_norm(x + dropout(self.dropout, a))
      f = ffn(x)
      x = ffn_norm(x + dropout(self.dropout, f))
    return x, {"ffn": f, "block": x}


def scaled_init(scale: float) -> nn.initializers.Initializer:
  """N(0, 0.02 · scale): BEiT divides block i's attention output and fc2 by √(2i)."""
  return nn.initializers.normal(INIT_STD * scale)


def layer_drop(module: nn.Module, y, x, rate: float, *, train: bool):
  """LayerDrop: the block's output `y`, or in training with probability `rate` its input `x`
  (one draw per batch from `module`'s dropout stream). Under jit the block is still computed and
  the skip is a select, which keeps one static graph."""
  if not train or rate <= 0:
    return y
  keep = jax.random.uniform(module.make_rng("dropout")) >= rate
  return jnp.where(keep, y, x)


class Encoder(nn.Module):
  """A stack of blocks; returns the output and every block's sublayer outputs.

  LayerDrop (fairseq speech): in training each block is skipped with probability `layerdrop`,
  one draw per batch. Under jit the block is still computed and the skip is a select, which keeps
  one static graph. Stochastic depth (vision) rises linearly from 0 to `drop_path_rate` over the
  blocks. `rescale_init` divides block i's (1-based) output projections' init by √(2i) (BEiT).
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  pre_norm: bool = False
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 0.0
  key_bias: bool = True
  rescale_init: bool = False
  layer_norm_eps: float = 1e-5
  execution: Execution = Execution()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, *, train: bool):
    # attention_bias: [H, T, T] shared by every block, or [L, H, T, T] one per block.
    per_block = attention_bias is not None and attention_bias.ndim == 4
    if per_block and attention_bias.shape[0] != self.num_layers:
      raise ValueError(f"{attention_bias.shape[0]} attention biases for {self.num_layers} blocks")
    block = block_class(Block, self.execution)
    layer_results = []
    for i in range(self.num_layers):
      drop_path = self.drop_path_rate * i / max(self.num_layers - 1, 1)
      out_init = scaled_init((2.0 * (i + 1)) ** -0.5) if self.rescale_init else bert_init
      y, aux = block(
        self.num_heads,
        self.mlp_dim,
        pre_norm=self.pre_norm,
        dropout=self.dropout,
        attention_dropout=self.attention_dropout,
        activation_dropout=self.activation_dropout,
        drop_path=drop_path,
        layer_scale_init=self.layer_scale_init,
        key_bias=self.key_bias,
        layer_norm_eps=self.layer_norm_eps,
        out_init=out_init,
        fused_attention=self.execution.fused_attention,
        dtype=self.dtype,
        name=f"layer_{i:02d}",
      )(x, padding_mask, attention_bias[i] if per_block else attention_bias, train)
      x = layer_drop(self, y, x, self.layerdrop, train=train)
      layer_results.append(aux)
    return x, layer_results
