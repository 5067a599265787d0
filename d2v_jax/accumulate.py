"""Gradient accumulation inside the jitted step: one update from several micro-batches.

When the recipe's batch does not fit a device, `config.loop.micro_batches = k` keeps the global
batch (and so the optimiser, its schedule and the EMA teacher, which all count updates) and
computes it in k sequential slices, holding the activations of one slice at a time. The slices
are a `lax.scan` inside the same compiled step, so nothing returns to the host between them.

Slice j takes rows j, j + k, j + 2k, ... of the batch: every device keeps contributing its own
rows to every slice, so the batch's device layout (split over `data` x `fsdp`) needs no
resharding. The loss, gradient and metrics are the means over the slices; with losses that are
means over masked positions, that equals the full-batch loss when the slices mask as many
positions (always for images and text, nearly for speech, whose padding varies).
"""

import jax
import jax.numpy as jnp


def value_and_grad(loss_fn, params, batch, rng, micro_batches: int = 1):
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)`, over `micro_batches`
  slices of `batch` (a pytree of arrays sharing the leading batch axis).

  `loss_fn(params, batch, rng) -> (loss, {metric: scalar})`. Slice j gets
  `jax.random.fold_in(rng, j)`; with one slice, `rng` itself (the step is then unchanged).
  Returns ((loss, metrics), grads), averaged over the slices.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch, rng)
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % micro_batches:
    raise ValueError(
      f"config.loop.micro_batches={micro_batches} does not divide the batch of {size} rows"
    )

  def strided(x):  # [B, ...] -> [k, B/k, ...]: slice j holds rows j, j + k, ...
    return jnp.swapaxes(x.reshape(size // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

  slices = jax.tree.map(strided, batch)
  first = jax.tree.map(lambda x: x[0], slices)
  shapes = jax.eval_shape(grad_fn, params, first, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

  def add_slice(total, indexed):
    index, micro_batch = indexed
    out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(lambda t, o: t + o.astype(jnp.float32), total, out), None

  total, _ = jax.lax.scan(add_slice, zeros, (jnp.arange(micro_batches), slices))
  return jax.tree.map(lambda t: t / micro_batches, total)
