"""data2vec 1.0 image pretraining (spec §1, vision columns; BEiT ViT).

    python main.py --config=configs/image.py --workdir=runs/image_tiny
    python main.py --config=configs/image.py:variant=base --workdir=runs/image_base \
        --config.input.source=tfds --config.input.path=imagenet2012 \
        --config.input.tfds_data_dir=/data/tfds

    python main.py --config=configs/image.py:version=2 --workdir=runs/image_v2_tiny

Arguments after the colon: `variant=tiny|base|large` (default tiny: a small ViT on the embedded
digits, 8×8 scans upsampled to 32² and cut into 4×4 patches) and `version=1|2` (data2vec 2.0:
spec §2, `d2v_jax/models/data2vec2.py`, `d2v_jax/steps_v2.py`). Any field can be overridden with
`--config.<group>.<field>=value`; unknown fields are an error. `config.model.image_size` is shared
with `config.input.image_size`: overriding one sets both.
"""

import ml_collections

from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167


def _epochs_to_steps(epochs: float, batch: int, num_images: int = IMAGENET_TRAIN_IMAGES) -> int:
  return int(epochs * (num_images // batch))


# Per variant: train steps, global batch, peak LR, warm-up steps, EMA decay, LayerScale init,
# stochastic depth, attention dropout, top-K target blocks.
_RECIPES = {
  # CPU run on the embedded digits (1,442 training scans), about 9 minutes on 2 cores: 600
  # updates of batch 64 (27 epochs), a 10% warm-up, and a faster EMA than the paper's (its time
  # constant, 500 updates, must fit in the run). Probe result in the README.
  "tiny": dict(
    steps=600,
    batch=64,
    lr=2e-3,
    warmup=60,
    ema=0.998,
    layer_scale=0.1,
    drop_path=0.0,
    attention_dropout=0.0,
    top_k=2,
  ),
  # spec §1.5, data2vec_vision README: ViT-B/16, 800 epochs at batch 2048, LR 2e-3 with 10 warm-up
  # epochs, EMA constant 0.9998, LayerScale 0.1 (run_cyclical's default for base), drop path 0.25.
  "base": dict(
    steps=_epochs_to_steps(800, 2048),
    batch=2048,
    lr=2e-3,
    warmup=_epochs_to_steps(10, 2048),
    ema=0.9998,
    layer_scale=0.1,
    drop_path=0.25,
    attention_dropout=0.05,
    top_k=6,
  ),
  # ViT-L/16: 800 epochs at batch 4096 (README; the paper says 8192), LR 1e-3, 80 warm-up
  # epochs, LayerScale 1e-5, drop path 0.2, attention dropout 0.15. (The paper then trains 800
  # more epochs from this result at EMA 0.9999 with 40 warm-up epochs: a second run.)
  "large": dict(
    steps=_epochs_to_steps(800, 4096),
    batch=4096,
    lr=1e-3,
    warmup=_epochs_to_steps(80, 4096),
    ema=0.9998,
    layer_scale=1e-5,
    drop_path=0.2,
    attention_dropout=0.15,
    top_k=6,
  ),
}

# BEiT-style block masking of 120 of 196 patches at 224² (about 61%), blocks of >= 16 patches;
# other grids keep the same fractions (masking.block_mask_sizes).
_MASKED_PATCHES, _MIN_BLOCK, _REFERENCE_PATCHES = 120, 16, 196


# data2vec 2.0 per variant (spec §2.3, image columns): updates, batch, clones M, peak LR,
# warm-up, EMA (start, end, anneal updates), prenet blocks, top-K main blocks, decoder (dim,
# kernel, layers).
_V2_RECIPES = {
  # CPU run on the embedded digits: 32 images × 8 clones, the teacher's time constant inside the
  # run as in v1's tiny recipe; an 8×8 grid keeps 12 patches per clone.
  "tiny": dict(
    steps=600,
    batch=32,
    clones=8,
    lr=2e-3,
    warmup=60,
    ema=(0.998, 0.9995, 600),
    prenet=0,
    top_k=4,
    decoder=(96, 3, 3),
  ),
  "base": dict(
    steps=375_300,
    batch=256,
    clones=16,
    lr=1e-3,
    warmup=50_040,
    ema=(0.9998, 0.99999, 100_000),
    prenet=2,
    top_k=10,
    decoder=(768, 3, 6),
  ),
  "large": dict(
    steps=375_300,
    batch=128,
    clones=16,
    lr=4e-4,
    warmup=50_040,
    ema=(0.9998, 0.99999, 150_000),
    prenet=0,
    top_k=18,
    decoder=(1024, 5, 3),
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.versioned_config(arg, _version1, _version2, _RECIPES)


def _version2(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """data2vec 2.0 on the v1 config's data, probe and loop groups (spec §2.1-§2.3)."""
  recipe = _V2_RECIPES[variant]
  config.version = 2
  dim, kernel, layers = recipe["decoder"]
  config.model = common.v2_model(
    variant,
    dropout=0.0,
    norm_eps=1e-6,
    decoder=common.v2_decoder(dim, kernel, layers, input_dropout=0.0),
    image_size=config.model.get_ref("image_size"),  # shared with config.input
    patch_size=config.model.patch_size,
    prenet_depth=recipe["prenet"],
  )
  # Inverse block masking: 3×3 blocks around ⌊N(0.2 + 0.07)/9⌋ centres are KEPT, then single
  # patches are added or removed until exactly ⌊0.2 N⌋ are kept (spec §2.2).
  config.masking = ml_collections.ConfigDict(
    dict(num_clones=recipe["clones"], block=3, ratio=0.8, adjust=0.07, inverse=True)
  )
  config.targets = common.v2_targets(recipe["top_k"], final_norm="layer")
  # L2 summed over D, scaled by 1/√D (scale None), plus the CLS loss weighted 0.01.
  config.loss = ml_collections.ConfigDict(dict(scale=None, cls_weight=0.01))
  config.ema = common.v2_ema(
    recipe["ema"], teacher_params=("frontend", "encoder")
  )  # not the decoder
  config.optim.update(
    dict(
      lr=recipe["lr"],
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      no_decay=(),
      clip_norm=4.0,
      warmup_steps=recipe["warmup"],
      end_lr=0.0,
    )
  )
  config.input.batch_size = recipe["batch"]
  config.input.crop_scale = (0.2, 1.0)  # RandomResizedCrop(0.2-1) + flip (spec §2.3)
  config.input.color_jitter = 0.0
  config.loop.total_steps = recipe["steps"]
  return config


def _version1(variant: str) -> ml_collections.ConfigDict:
  recipe = _RECIPES[variant]
  image_size = ml_collections.FieldReference(32 if variant == "tiny" else 224)
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"
  config.modality = "image"
  config.version = 1
  config.seed = 0

  config.model = ml_collections.ConfigDict(
    dict(
      variant=variant,
      image_size=image_size,
      patch_size=4 if variant == "tiny" else 16,
      dropout=0.0,
      attention_dropout=recipe["attention_dropout"],
      drop_path_rate=recipe["drop_path"],
      layer_scale_init=recipe["layer_scale"],
      layer_norm_eps=1e-6,  # BEiT's; HF's converted checkpoints keep HF's default 1e-12
      **common.execution_fields(),
    )
  )
  config.masking = ml_collections.ConfigDict(
    dict(
      masked_patches=_MASKED_PATCHES,  # of `reference_patches`; scaled to the model's grid
      min_block=_MIN_BLOCK,
      reference_patches=_REFERENCE_PATCHES,
      min_aspect=0.3,  # block aspect ratios in [0.3, 1/0.3]
    )
  )
  config.targets = ml_collections.ConfigDict(
    dict(
      top_k=recipe["top_k"],
      layer_output="block",  # end of block, after the FFN residual (`--layer_results end`)
      layer_norm="layer",  # each block's output LayerNorm'd over D without affine
      final_norm="layer",  # and the average LayerNorm'd again
    )
  )
  # Smooth-L1 with beta 2, averaged over tokens and dimensions, no extra scale (spec §1.3).
  config.loss = ml_collections.ConfigDict(dict(beta=2.0, scale=1.0, reduce_dims="mean"))
  config.ema = ml_collections.ConfigDict(
    dict(
      decay=recipe["ema"],
      end_decay=recipe["ema"],  # constant: data2vec_vision never uses its ramp (ema_start_at 0)
      anneal_steps=0,
      # spec §1.4: the whole model is EMA'd (timm ModelEmaV2); nothing is shared or copied.
      teacher_params=("frontend", "mask_emb", "encoder", "final_proj"),
      copy_params=(),
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=recipe["lr"],
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      decay_1d=False,  # no decay on 1-D parameters and biases...
      no_decay=(r"rel_pos_bias/table$",),  # ...nor on the position table (cls/mask are 1-D)
      clip_norm=3.0,
      schedule="cosine",
      warmup_steps=recipe["warmup"],
      end_lr=1e-5,
    )
  )
  config.input = ml_collections.ConfigDict(
    dict(
      source="embedded",  # embedded (scikit-learn digits) | folder | tfds
      path="",  # image folder, or TFDS dataset name
      split="train",
      tfds_data_dir="",
      tfds_feature="image",
      image_size=image_size,
      batch_size=recipe["batch"],  # global batch, split across processes and devices
      crop_scale=(0.08, 1.0),  # RandomResizedCrop area range
      crop_ratio=(3 / 4, 4 / 3),
      flip=True,
      color_jitter=0.4,  # brightness/contrast/saturation strength; 0 = off
      mean=(0.485, 0.456, 0.406),  # ImageNet statistics, as data2vec_vision
      std=(0.229, 0.224, 0.225),
      num_workers=0,
    )
  )
  config.loop = common.loop_config(recipe["steps"])
  config.extract = common.extract_config()
  config.probe = common.probe_config(every=200 if variant == "tiny" else 5000, batch_size=64)
  return config
