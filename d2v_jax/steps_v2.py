"""The data2vec 2.0 pretraining step (spec §2.1, §2.3; fairseq `data2vec2.py` `forward`).

Inside one jitted function, per step:
  1. keys: the step folded into the loop key -> `mask`, `dropout` and `noise` streams;
  2. the student embeds the batch once (images: patches + fixed positions; text: embeddings);
  3. the teacher (EMA parameters, eval mode, stop_gradient) encodes every sample ONCE, unmasked:
     images embed with the teacher's own patch embedding, text reads the student's embeddings
     (shared, spec §2.3); its targets: the FFN outputs of the top K main blocks (prenet
     excluded), each instance-normalised over positions, averaged, then (images) LayerNorm'd;
  4. each sample is repeated M times (`clone_batch`, sample-major) with M independent masks
     drawn with `jax.random` (static kept count K);
  5. the student encodes the kept tokens only, the decoder predicts every position, and the loss
     is L2 summed over D, scaled by 1/√D (images) or 1 (text), averaged over masked valid
     positions, against the targets repeated M times;
  6. images: the CLS loss, L2/√D between the last CLS output and the position-mean of the
     sample's targets, weighted 0.01 and summed over the M·B rows (fairseq multiplies it by the
     masked count before dividing the whole loss by that count);
  7. gradient, optimiser update, then the EMA of the teacher with τ(step).
"""

import jax
import jax.numpy as jnp
import ml_collections

from d2v_jax import accumulate, losses, masking_v2
from d2v_jax.state import TrainState
from d2v_jax.steps import (
  micro_batches,
  model_inputs,
  teacher_targets,
  update_student_and_teacher,
)


def draw_masks(rng, batch: int, length: int, config, grid=None) -> masking_v2.V2Mask:
  """M masks per sample, [B·M, N] (spec §2.2): inverse 2-D block masking of the patch grid
  (images), 1-D block masking of the frames (speech) or MAE random masking (text)."""
  m = config.masking
  if config.modality == "image":
    shape = dict(mask_fn=masking_v2.block_mask_2d, grid=grid, block=m.block, adjust=m.adjust)
    shape["inverse"] = m.inverse
  elif config.modality == "audio":
    shape = dict(mask_fn=masking_v2.block_mask_1d, length=length, block=m.block, adjust=m.adjust)
  elif config.modality == "text":
    shape = dict(mask_fn=masking_v2.random_mask, length=length)
  else:
    raise ValueError(f"No data2vec 2.0 masking for modality {config.modality!r}")
  mask_fn = shape.pop("mask_fn")
  return masking_v2.multi_mask(rng, mask_fn, batch, m.num_clones, ratio=m.ratio, **shape)


def cls_loss(cls_pred, y, token_padding, num_clones: int):
  """Σ over rows of L2/√D between the CLS output [B·M, D] and the mean target [B, D] (repeated)."""
  valid = (~token_padding)[..., None].astype(jnp.float32)
  mean = jnp.sum(y * valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1.0)  # [B, D]
  target = masking_v2.clone_batch(mean, num_clones)
  per_row = jnp.sum(jnp.square(cls_pred.astype(jnp.float32) - target), -1)
  return jnp.sum(per_row) * cls_pred.shape[-1] ** -0.5


def make_pretrain_step(model, tx, schedule, config: ml_collections.ConfigDict):
  """Returns `step(state, batch, loop_key) -> (state, metrics)`, pure and ready for jit."""
  num_clones = config.masking.num_clones
  grid = getattr(model.decoder, "grid", None)

  def step(state: TrainState, batch, loop_key):
    rng = jax.random.fold_in(loop_key, state.step)
    inputs, padding = model_inputs(batch, config.modality)

    def loss_fn(params, micro_batch, micro_rng):  # one slice of the batch (accumulate.py)
      inputs, padding = micro_batch
      mask_rng, dropout_rng, noise_rng = jax.random.split(micro_rng, 3)
      variables = {"params": params}
      rngs = {"dropout": dropout_rng, "noise": noise_rng}
      tokens, token_padding = model.apply(
        variables, inputs, padding, train=True, rngs=rngs, method=model.embed
      )  # [B, N, D]: embedded once, then repeated
      y = jax.lax.stop_gradient(
        teacher_targets(
          model,
          config,
          state.teacher,
          inputs,
          padding,
          jax.lax.stop_gradient(tokens),
          token_padding,
        )
      )  # [B, N, D]: one teacher pass per sample
      batch_size, length = token_padding.shape
      masks = draw_masks(mask_rng, batch_size, length, config, grid)  # [B·M, N]
      clones = masking_v2.clone_batch(tokens, num_clones)  # [B·M, N, D]
      clone_padding = masking_v2.clone_batch(token_padding, num_clones)
      x, aux = model.apply(
        variables, clones, clone_padding, masks.keep_ids, train=True, rngs=rngs, method=model.encode
      )  # [B·M, K, D]
      pred = model.apply(
        variables, x, masks, clone_padding, train=True, rngs=rngs, method=model.decode
      )  # [B·M, N, D]
      target = masking_v2.clone_batch(y, num_clones)
      weights = masks.mask & ~clone_padding
      regression, num_masked = losses.regression_loss(
        pred, target, weights, beta=0.0, scale=config.loss.scale, reduce_dims="sum"
      )
      loss = regression
      metrics = {"regression_loss": regression, "num_masked": num_masked}
      if aux["cls"] is not None and config.loss.cls_weight > 0:
        cls = config.loss.cls_weight * cls_loss(aux["cls"], y, token_padding, num_clones)
        loss = loss + cls
        metrics["cls_loss"] = cls
      metrics.update(
        target_var=losses.masked_std(target, weights),
        pred_var=losses.masked_std(pred, weights),
        feature_std=losses.masked_std(tokens, ~token_padding),
      )
      return loss, metrics

    (loss, aux), grads = accumulate.value_and_grad(
      loss_fn, state.params, (inputs, padding), rng, micro_batches(config)
    )
    return update_student_and_teacher(
      state, grads, tx, schedule, config, inputs, padding, {"loss": loss, **aux}
    )

  return step
