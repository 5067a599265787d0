"""PyTorch reference of the data2vec 1.0 pretraining step (issue 7, item 2), for bench/step.py.

Runs in the torch interpreter (Python 3.11, torch 2.13 CPU, transformers 5.23; bench/README.md),
launched by `bench/step.py --torch` with a JSON spec of the JAX step's architecture, batch, loss
and optimiser; prints one `BENCH_RESULT {json}` line. It never imports d2v_jax (another Python).

One step, as `d2v_jax/steps.py` does it:
  - the student is transformers' `Data2VecAudioModel` / `Data2VecVisionModel` /
    `Data2VecTextModel` of the same sizes (dropouts as ours; HF's LayerDrop off: ours computes every
    block anyway) with a learned mask embedding (audio, images) or `<mask>` ids (text);
  - the teacher is an EMA copy, run in eval mode without gradient on the unmasked input: speech's
    is the encoder alone on the student's CNN features (shared), images' and text's the model;
  - targets: the top-K blocks' FFN outputs (forward hooks on `feed_forward.output_dense` /
    `output.dense`, spec §4 "Caution for targets") or, for images, end-of-block hidden states
    without CLS; each instance- or layer-normalised, averaged, then the final norm;
  - the regression head (Linear D->D; text: D->2D->GELU->D) at masked positions, L2 (β = 0) or
    smooth-L1, summed or averaged over D, scaled; then backward, gradient clipping, AdamW and
    the EMA update of the teacher (every teacher tensor, copies included).
Masks are drawn uniformly with the same masked fraction as ours (which positions are masked does
not change v1's compute: the student encodes every position).
"""

import argparse
import copy
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from torch import nn

RESULT_TAG = "BENCH_RESULT "


def audio_student(spec: dict):
  s = spec["sizes"]
  config = transformers.Data2VecAudioConfig(
    hidden_size=s["dim"],
    num_hidden_layers=s["num_layers"],
    num_attention_heads=s["num_heads"],
    intermediate_size=s["mlp_dim"],
    hidden_dropout=spec["dropout"],
    attention_dropout=spec["attention_dropout"],
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    conv_dim=(s["conv_dim"],) * 7,
    conv_bias=False,
    num_conv_pos_embeddings=s["pos_conv_depth"],
    conv_pos_kernel_size=s["pos_conv_kernel"],
    num_conv_pos_embedding_groups=s["pos_conv_groups"],
    mask_time_prob=0.05,  # only so that the model holds `masked_spec_embed`; masks are ours
    layer_norm_eps=1e-5,
  )
  return transformers.Data2VecAudioModel(config)


def image_student(spec: dict):
  s = spec["sizes"]
  config = transformers.Data2VecVisionConfig(
    hidden_size=s["dim"],
    num_hidden_layers=s["num_layers"],
    num_attention_heads=s["num_heads"],
    intermediate_size=s["mlp_dim"],
    hidden_dropout_prob=spec["dropout"],
    attention_probs_dropout_prob=spec["attention_dropout"],
    drop_path_rate=spec["drop_path"],
    layer_scale_init_value=spec["layer_scale"],
    layer_norm_eps=spec["layer_norm_eps"],
    image_size=s["image_size"],
    patch_size=s["patch_size"],
    use_mask_token=True,
    use_shared_relative_position_bias=True,
    use_mean_pooling=False,
  )
  return transformers.Data2VecVisionModel(config, add_pooling_layer=False)


def text_student(spec: dict):
  s = spec["sizes"]
  config = transformers.Data2VecTextConfig(
    vocab_size=s["vocab_size"],
    hidden_size=s["dim"],
    num_hidden_layers=s["num_layers"],
    num_attention_heads=s["num_heads"],
    intermediate_size=s["mlp_dim"],
    hidden_dropout_prob=spec["dropout"],
    attention_probs_dropout_prob=spec["attention_dropout"],
    max_position_embeddings=spec["length"] + spec["pad_id"] + 1,  # RoBERTa's position offset
    type_vocab_size=1,
    layer_norm_eps=spec["layer_norm_eps"],
    pad_token_id=spec["pad_id"],
  )
  return transformers.Data2VecTextModel(config, add_pooling_layer=False)


def regression_head(spec: dict) -> nn.Module:
  dim = spec["sizes"]["dim"]
  if spec["modality"] == "text":
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
  return nn.Linear(dim, dim)


def ffn_layers(teacher, modality: str) -> list[nn.Module]:
  """The teacher's FFN output Linear of every block (the v1 speech and text targets)."""
  if modality == "audio":
    return [layer.feed_forward.output_dense for layer in teacher.layers]
  return [layer.output.dense for layer in teacher.encoder.layer]


def normalise(x, kind: str):
  x = x.float()
  if kind == "instance":  # over time, per channel
    return F.instance_norm(x.transpose(1, 2), eps=1e-5).transpose(1, 2)
  if kind == "layer":
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)
  return x


def build_targets(layers: list, spec: dict):
  top = layers[-spec["top_k"] :]
  y = sum(normalise(t, spec["layer_norm"]) for t in top) / len(top)
  return normalise(y, spec["final_norm"])


def regression_loss(pred, target, mask, spec: dict):
  error = pred.float() - target
  if spec["beta"] == 0:
    per_dim = error.square()
  else:
    per_dim = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=spec["beta"])
  per_position = per_dim.sum(-1) if spec["reduce_dims"] == "sum" else per_dim.mean(-1)
  scale = spec["scale"] if spec["scale"] is not None else pred.shape[-1] ** -0.5
  weights = mask.float()
  return (per_position * weights).sum() * scale / weights.sum().clamp(min=1.0)


def random_mask(batch: int, length: int, fraction: float, protect_ends: bool = False):
  """bool[B, T] with exactly round(fraction · T) masked positions per row."""
  keys = torch.rand(batch, length)
  if protect_ends:  # text: never <s> or </s>
    keys[:, 0] = keys[:, -1] = 2.0
  count = max(1, round(fraction * length))
  mask = torch.zeros(batch, length, dtype=torch.bool)
  return mask.scatter_(1, keys.argsort(1)[:, :count], True)


class Reference:
  """Student, head, EMA teacher and AdamW for one modality; `step(batch)` -> loss."""

  def __init__(self, spec: dict):
    self.spec = spec
    modality = spec["modality"]
    self.student = {"audio": audio_student, "image": image_student, "text": text_student}[modality](
      spec
    )
    self.head = regression_head(spec)
    teacher_source = self.student.encoder if modality == "audio" else self.student
    self.teacher = copy.deepcopy(teacher_source).eval().requires_grad_(False)
    self.teacher_source = teacher_source
    self.ffn_outputs = []
    if modality != "image":
      for layer in ffn_layers(self.teacher, modality):
        layer.register_forward_hook(lambda _m, _i, out: self.ffn_outputs.append(out))
    params = list(self.student.parameters()) + list(self.head.parameters())
    self.params = params
    self.optimizer = torch.optim.AdamW(
      params,
      lr=spec["lr"],
      betas=(spec["b1"], spec["b2"]),
      eps=spec["eps"],
      weight_decay=spec["weight_decay"],
      fused=True,
    )

  def teacher_targets(self, inputs):
    self.ffn_outputs.clear()
    with torch.no_grad():
      if self.spec["modality"] == "image":
        hidden = self.teacher(inputs, output_hidden_states=True).hidden_states[1:]
        return build_targets([h[:, 1:] for h in hidden], self.spec)  # end of block, no CLS
      self.teacher(inputs) if self.spec["modality"] == "audio" else self.teacher(input_ids=inputs)
      return build_targets(list(self.ffn_outputs), self.spec)

  def forward_loss(self, batch):
    spec, student = self.spec, self.student
    if spec["modality"] == "audio":
      features = student.feature_extractor(batch).transpose(1, 2)
      tokens, _ = student.feature_projection(features)  # [B, T', D], shared with the teacher
      y = self.teacher_targets(tokens.detach())
      mask = random_mask(tokens.shape[0], tokens.shape[1], spec["mask_fraction"])
      masked = torch.where(mask[..., None], student.masked_spec_embed, tokens)
      x = student.encoder(masked).last_hidden_state
    elif spec["modality"] == "image":
      y = self.teacher_targets(batch)
      mask = random_mask(y.shape[0], y.shape[1], spec["mask_fraction"])
      x = student(batch, bool_masked_pos=mask).last_hidden_state[:, 1:]
    else:
      y = self.teacher_targets(batch)
      mask = random_mask(*batch.shape, spec["mask_fraction"], protect_ends=True)
      masked = torch.where(mask, spec["sizes"]["vocab_size"] - 1, batch)
      x = student(input_ids=masked).last_hidden_state
    return regression_loss(self.head(x), y, mask, spec)

  def step(self, batch) -> float:
    self.student.train()
    loss = self.forward_loss(batch)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.spec["clip_norm"] > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.spec["clip_norm"])
    self.optimizer.step()
    self.ema_update()
    return float(loss.detach())

  @torch.no_grad()
  def ema_update(self):
    decay = self.spec["ema_decay"]
    teacher = list(self.teacher.parameters())
    source = list(self.teacher_source.parameters())
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, source, alpha=1.0 - decay)


def synthetic_batch(spec: dict):
  """Inputs of the JAX benchmark's shapes: waveforms, NCHW images or token ids."""
  generator = torch.Generator().manual_seed(0)
  batch, length = spec["batch"], spec["length"]
  if spec["modality"] == "audio":
    return torch.randn(batch, length, generator=generator)
  if spec["modality"] == "image":
    size = spec["sizes"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=generator)
  vocab = spec["sizes"]["vocab_size"]
  tokens = torch.randint(4, vocab - 1, (batch, length), generator=generator)
  tokens[:, 0], tokens[:, -1] = 0, 2
  return tokens


def run(spec: dict, threads: int) -> dict:
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  reference = Reference(spec)
  batch = synthetic_batch(spec)
  times, losses = [], []
  for i in range(spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    losses.append(reference.step(batch))
    if i >= spec["warmup"]:
      times.append(time.perf_counter() - start)
  num_params = sum(p.numel() for p in reference.params)
  return dict(
    step_s=statistics.median(times),
    step_times=times,
    losses=losses,
    loss_finite=all(abs(v) < float("inf") for v in losses),
    num_params=num_params,
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    attention=reference.student.config._attn_implementation,
    torch=torch.__version__,
    transformers=transformers.__version__,
    threads=torch.get_num_threads(),
    load_average=os.getloadavg()[0],
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--spec", required=True, help="JSON from bench/step.py")
  parser.add_argument("--threads", type=int, default=1)
  args = parser.parse_args()
  print(RESULT_TAG + json.dumps(run(json.loads(args.spec), args.threads)), flush=True)


if __name__ == "__main__":
  main()
