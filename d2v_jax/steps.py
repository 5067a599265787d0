"""The data2vec pretraining step: one pure function, jitted once per input shape (spec §0).

Order inside the step:
  1. keys: fold the step into the loop key, split into `mask` and `dropout` streams;
  2. student front end on the input -> tokens and their padding mask;
  3. mask drawn with jax.random (static shape, same count per row; never on padding);
  4. teacher (eval mode, stop_gradient) encodes the unmasked input -> normalised top-K targets;
  5. student encodes the masked tokens -> regression head -> loss at masked, valid positions;
  6. gradient (accumulated over `config.loop.micro_batches` slices of the batch, if set), Adam
     update, then the EMA update of the teacher with τ(step).

Text masks token ids before step 2 instead (`<mask>` and random tokens replace input ids), so the
student's embedding sees the corrupted ids and no mask embedding is used.

What the teacher reads depends on what it mirrors (spec §1.4): for speech it holds only the
encoder and reads the student's CNN features (shared); for vision (the whole model) and text
(encoder plus embeddings copied from the student) it embeds the clean input itself. Its forward
runs inside the differentiated function only because the shared speech features are computed
there; it is wrapped in `stop_gradient`, so no backward pass is built for it and the shared front
end runs once per step.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2v_jax import accumulate, losses, masking, targets, teacher
from d2v_jax.state import TrainState

# Batch keys of each modality's model input (DESIGN.md, "Batches").
INPUT_KEYS = {"audio": "audio", "image": "image", "text": "tokens"}


def model_inputs(batch, modality: str):
  """(inputs, padding_mask) of a batch; padding_mask is True at padded positions.

  Images are never padded: their padding mask is None.
  """
  inputs = batch[INPUT_KEYS[modality]]
  if modality == "image":
    return inputs, None
  padding = batch.get("padding_mask")
  if padding is None:
    padding = jnp.zeros(inputs.shape[:2], bool)
  return inputs, padding


def scale_gradient(x, scale: float):
  """Identity forward; multiplies the gradient by `scale` (fairseq's `feature_grad_mult`)."""
  if scale == 1.0:
    return x
  return scale * x + (1.0 - scale) * jax.lax.stop_gradient(x)


def draw_mask(rng, token_padding, config: ml_collections.ConfigDict, grid=None):
  """The student's mask for `config.modality` (spec §1.2): bool[B, T], True = masked.

  `grid` is the (rows, cols) patch grid of image models.
  """
  m = config.masking
  if config.modality == "audio":
    return masking.span_mask(
      rng, token_padding, prob=m.prob, length=m.length, min_masks=m.min_masks
    )
  if config.modality == "image":
    num_masked, min_block = masking.block_mask_sizes(
      grid[0] * grid[1],
      num_masked_ref=m.masked_patches,
      min_block_ref=m.min_block,
      num_patches_ref=m.reference_patches,
    )
    return masking.block_mask(
      rng,
      token_padding.shape[0],
      grid,
      num_masked=num_masked,
      min_block=min_block,
      min_aspect=m.min_aspect,
    )
  raise ValueError(f"No masking defined for modality {config.modality!r}")


def mask_token_ids(rng, tokens, padding_mask, config: ml_collections.ConfigDict):
  """Text masking on token ids (spec §1.2 text): (student ids, selected, loss positions).

  `config.masking.scheme`: 'span' (the released config: spans of 4 `<mask>` tokens, 35%) or
  'bert' (the paper: 15%, of which 80% `<mask>`, 10% random, 10% unchanged). The loss is taken at
  the positions that became `<mask>` when `config.masking.loss_on_mask_only` (the released code;
  the random/unchanged 20% of BERT masking then get none), else at every selected position.
  """
  m = config.masking
  special_ids = tuple(m.special_ids)
  if m.scheme == "span":
    corrupted, selected, replaced = masking.text_span_mask(
      rng,
      tokens,
      padding_mask,
      special_ids=special_ids,
      mask_id=m.mask_id,
      prob=m.span_prob,
      length=m.span_length,
    )
  elif m.scheme == "bert":
    corrupted, selected, replaced = masking.bert_mask(
      rng,
      tokens,
      padding_mask,
      special_ids=special_ids,
      mask_id=m.mask_id,
      vocab_size=config.model.vocab_size,
      prob=m.bert_prob,
      random_prob=m.random_prob,
      leave_prob=m.leave_prob,
    )
  else:
    raise ValueError(f"config.masking.scheme={m.scheme!r}: use 'span' or 'bert'")
  return corrupted, selected, replaced if m.loss_on_mask_only else selected


def teacher_targets(model, config, teacher_params, inputs, padding, tokens, token_padding):
  """The teacher's normalised top-K targets [B, T, D] on the unmasked input (spec §1.3, §1.4,
  §2.1.5), for data2vec 1.0 and 2.0 alike.

  A teacher that mirrors the front end (vision: the whole model) embeds the raw `inputs` itself;
  one that mirrors only the encoder (speech; text in 2.0) reads the student's `tokens`. A 2.0
  model's prenet blocks (`model.num_prenet`) give no targets; its targets are FFN outputs.
  """
  if "frontend" in teacher_params:
    tokens, token_padding = model.apply(
      {"params": teacher_params}, inputs, padding, train=False, method=model.embed
    )
  _, aux = model.encoder.apply(
    {"params": teacher_params["encoder"]}, tokens, token_padding, train=False
  )
  t = config.targets
  return targets.build_targets(
    aux["layers"][getattr(model, "num_prenet", 0) :],
    token_padding,
    top_k=t.top_k,
    layer_output=t.get("layer_output", "ffn"),
    layer_norm_kind=t.layer_norm,
    final_norm=t.final_norm,
  )


def make_pretrain_step(model, tx, schedule, config: ml_collections.ConfigDict):
  """Returns `step(state, batch, loop_key) -> (state, metrics)`, pure and ready for jit."""
  loss_scale = None if config.loss.scale < 0 else config.loss.scale
  grid = getattr(model.encoder, "grid", None)
  masks_input_ids = config.modality == "text"

  def step(state: TrainState, batch, loop_key):
    rng = jax.random.fold_in(loop_key, state.step)
    inputs, padding = model_inputs(batch, config.modality)

    def loss_fn(params, micro_batch, micro_rng):  # one slice of the batch (accumulate.py)
      inputs, padding = micro_batch
      mask_rng, dropout_rng = jax.random.split(micro_rng)
      variables = {"params": params}
      rngs = {"dropout": dropout_rng}
      student_inputs, mask, loss_mask = inputs, None, None
      if masks_input_ids:  # text: the student sees `<mask>` (and random) token ids
        student_inputs, mask, loss_mask = mask_token_ids(mask_rng, inputs, padding, config)
      tokens, token_padding = model.apply(
        variables, student_inputs, padding, train=True, rngs=rngs, method=model.embed
      )  # [B, T, D], [B, T]
      # Speech only (fairseq's feature_grad_mult); other front ends train at the full rate.
      tokens = scale_gradient(tokens, config.model.get("feature_grad_mult", 1.0))
      if not masks_input_ids:  # speech, images: masked embeddings become the mask embedding
        mask = loss_mask = draw_mask(mask_rng, token_padding, config, grid)
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
      )
      embedding_mask = None if masks_input_ids else mask
      x, _ = model.apply(
        variables, tokens, token_padding, embedding_mask, train=True, rngs=rngs, method=model.encode
      )
      pred = model.apply(variables, x, method=model.predict)  # [B, T, D]
      weights = loss_mask & ~token_padding
      loss, num_masked = losses.regression_loss(
        pred,
        y,
        weights,
        beta=config.loss.beta,
        scale=loss_scale,
        reduce_dims=config.loss.reduce_dims,
      )
      return loss, {
        "target_var": losses.masked_std(y, weights),
        "pred_var": losses.masked_std(pred, weights),
        # The front end can collapse while target_var looks healthy (instance norm rescales
        # whatever variation is left): its output std shows it (fairseq issue 5239).
        "feature_std": losses.masked_std(tokens, ~token_padding),
        "num_masked": num_masked,
      }

    (loss, aux), grads = accumulate.value_and_grad(
      loss_fn, state.params, (inputs, padding), rng, micro_batches(config)
    )
    return update_student_and_teacher(
      state, grads, tx, schedule, config, inputs, padding, {"loss": loss, **aux}
    )

  return step


def micro_batches(config) -> int:
  """Sequential slices of each batch (`config.loop.micro_batches`; accumulate.py)."""
  return config.loop.get("micro_batches", 1)


def update_student_and_teacher(
  state: TrainState, grads, tx, schedule, config, inputs, padding, metrics
):
  """The optimiser update of the student, then the EMA of the teacher with τ(step) (spec §0.4);
  returns (new state, the step's metrics with the update's added)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = teacher.ema_decay(
    state.step,
    decay=config.ema.decay,
    end_decay=config.ema.end_decay,
    anneal_steps=config.ema.anneal_steps,
  )
  new_teacher = teacher.ema_update(
    state.teacher,
    params,
    decay,
    names=tuple(config.ema.teacher_params),
    copied=teacher.copy_mask(state.teacher, config.ema.copy_params),
  )
  metrics = {
    **metrics,
    "ema_decay": decay,
    "lr": schedule(state.step),
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(params),  # after the update: a checkpoint must be finite
    # Samples (audio), tokens (text) or images actually seen.
    "valid_inputs": inputs.shape[0] if padding is None else jnp.sum(~padding),
  }
  new_state = state.replace(
    step=state.step + 1, params=params, teacher=new_teacher, opt_state=opt_state
  )
  return new_state, metrics
