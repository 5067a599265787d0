"""The fine-tuning train step and evaluation forward, jitted once per input shape (spec §1.6).

Per task:
  - `ctc` (speech): fairseq's fine-tuning masks stay on (time spans replaced by the mask
    embedding, feature channels zeroed); CTC loss summed over utterances and divided by their
    number (`sentence_avg`, the released configs), infeasible utterances contribute nothing;
  - `classify`: cross-entropy; images draw mixup/cutmix inside the step and learn from the mixed,
    smoothed targets, other modalities use (optionally smoothed) one-hot targets;
  - `regress` (text, STS-B): mean squared error on the single output.
Freezing (the speech CNN always, the transformer for the first updates) lives in the optimiser
(`optim.make_optimizer`), so the step has no branch on the step count.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2v_jax import accumulate, ctc, masking, mixup
from d2v_jax.models import audio
from d2v_jax.state import TrainState
from d2v_jax.steps import micro_batches, model_inputs


def speech_masks(rng, padding, dim: int, masking_cfg):
  """fairseq's fine-tuning masks: (time mask bool[B, T'] or None, channel mask bool[B, D] or None).

  `padding` is the waveform padding [B, samples]; time spans are drawn on the CNN's frames.
  """
  time_rng, channel_rng = jax.random.split(rng)
  time_mask = channel_mask = None
  if masking_cfg.mask_prob > 0:
    frames = audio.frame_padding_mask(padding)  # [B, T']
    time_mask = masking.span_mask(
      time_rng,
      frames,
      prob=masking_cfg.mask_prob,
      length=masking_cfg.mask_length,
      min_masks=masking_cfg.min_masks,
    )
  if masking_cfg.channel_prob > 0:
    no_padding = jnp.zeros((padding.shape[0], dim), bool)  # [B, D]: every channel is eligible
    channel_mask = masking.span_mask(
      channel_rng, no_padding, prob=masking_cfg.channel_prob, length=masking_cfg.channel_length
    )
  return time_mask, channel_mask


def classification_targets(rng, inputs, labels, num_classes: int, config):
  """(inputs, soft targets [B, C]): mixup/cutmix for images, label smoothing for every modality."""
  aug = config.get("mixup")
  if config.modality == "image" and aug is not None:
    return mixup.mix_batch(
      rng,
      inputs,
      labels,
      num_classes,
      mixup_alpha=aug.mixup_alpha,
      cutmix_alpha=aug.cutmix_alpha,
      label_smoothing=aug.label_smoothing,
      prob=aug.prob,
      switch_prob=aug.switch_prob,
    )
  smoothing = config.head.get("label_smoothing", 0.0)
  return inputs, mixup.smooth_one_hot(labels, num_classes, smoothing)


def task_loss(outputs, token_padding, batch, targets, task: str):
  """(loss, metrics) of one batch's head outputs."""
  if task == "ctc":
    per_utterance, infeasible = ctc.ctc_loss(
      outputs, token_padding, batch["labels"], batch["label_padding"]
    )
    loss, _ = ctc.reduce_ctc_loss(per_utterance, batch["label_padding"])
    return loss, {"ctc_infeasible": infeasible}
  if task == "classify":
    loss = jnp.mean(optax.softmax_cross_entropy(outputs, targets))
    hits = jnp.argmax(outputs, axis=-1) == batch["label"]
    return loss, {"train_accuracy": jnp.mean(hits)}
  if task == "regress":
    return jnp.mean(jnp.square(outputs[:, 0] - batch["target"])), {}
  raise ValueError(f"config.head.task={task!r}: use ctc, classify or regress")


def make_finetune_step(model, tx, schedule, config: ml_collections.ConfigDict):
  """Returns `step(state, batch, loop_key) -> (state, metrics)`, pure and ready for jit."""
  task, modality = config.head.task, config.modality

  def step(state: TrainState, batch, loop_key):
    rng = jax.random.fold_in(loop_key, state.step)
    inputs, padding = model_inputs(batch, modality)

    def loss_fn(params, batch, micro_rng):  # one slice of the batch (accumulate.py)
      mask_rng, mix_rng, dropout_rng = jax.random.split(micro_rng, 3)
      inputs, padding = model_inputs(batch, modality)
      time_mask = channel_mask = targets = None
      if modality == "audio":
        time_mask, channel_mask = speech_masks(mask_rng, padding, model.dim, config.masking)
      if task == "classify":
        inputs, targets = classification_targets(
          mix_rng, inputs, batch["label"], config.head.num_outputs, config
        )
      outputs, token_padding = model.apply(
        {"params": params},
        inputs,
        padding,
        time_mask,
        channel_mask,
        train=True,
        rngs={"dropout": dropout_rng},
      )
      return task_loss(outputs, token_padding, batch, targets, task)

    (loss, aux), grads = accumulate.value_and_grad(
      loss_fn, state.params, batch, rng, micro_batches(config)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      "lr": schedule(state.step),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "valid_inputs": inputs.shape[0] if padding is None else jnp.sum(~padding),
      **aux,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_predict(model, modality: str):
  """`predict(params, batch) -> (head outputs, token padding)` in eval mode (no masks)."""

  def predict(params, batch):
    inputs, padding = model_inputs(batch, modality)
    return model.apply({"params": params}, inputs, padding, train=False)

  return predict
