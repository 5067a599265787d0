"""Model sizes per modality: `tiny` for tests and CPU runs, then the paper's `base` and `large`.

Spec §1.1: base is 12 layers / 768 wide / 12 heads / FFN 3072; large is 24 / 1024 / 16 / 4096.
"""

# Shared transformer shapes.
_TRANSFORMER = {
  "tiny": dict(num_layers=4, dim=192, num_heads=4, mlp_dim=768),
  "base": dict(num_layers=12, dim=768, num_heads=12, mlp_dim=3072),
  "large": dict(num_layers=24, dim=1024, num_heads=16, mlp_dim=4096),
}

# Modality-specific front-end sizes.
_AUDIO = {
  # The CNN keeps the exact kernels and strides; only its width shrinks for CPU runs. The
  # positional conv shrinks with the crops: one grouped conv of 9 frames (180 ms), data2vec 1.0's
  # single-layer layout, instead of 5 x 19 (a 91-frame, 1.8 s receptive field, wider than the
  # tiny run's 25-50 frame crops). With the deep one, the front end collapses within a few hundred
  # updates (its output shrinks until the encoder input is the pos conv's smooth output, which
  # makes the targets predictable without any acoustic content) and the probe stays at chance.
  "tiny": dict(conv_dim=128, pos_conv_depth=1, pos_conv_kernel=9, pos_conv_groups=16),
  "base": dict(conv_dim=512, pos_conv_depth=5, pos_conv_kernel=19, pos_conv_groups=16),
  "large": dict(conv_dim=512, pos_conv_depth=5, pos_conv_kernel=19, pos_conv_groups=16),
}

# Images: ViT-B/16 and ViT-L/16 at 224² (14×14 patches). The tiny variant patches the embedded
# digits (8×8 scans, upsampled to 32²) into an 8×8 grid of 4×4 patches.
_IMAGE = {
  "tiny": dict(image_size=32, patch_size=4),
  "base": dict(image_size=224, patch_size=16),
  "large": dict(image_size=224, patch_size=16),
}

# Text: RoBERTa's GPT-2 BPE dictionary (50,265 with specials) and 512 positions for base; the
# tiny variant's vocabulary is the embedded corpus's tokenizer (configs/text.py sets it) and its
# blocks are 128 tokens long. There is no v1 text-large (spec §1.1).
_TEXT = {
  "tiny": dict(vocab_size=50265, max_positions=128),
  "base": dict(vocab_size=50265, max_positions=512),
  "large": dict(vocab_size=50265, max_positions=512),
}

_FRONTENDS = {"audio": _AUDIO, "image": _IMAGE, "text": _TEXT}


def decode_variant(modality: str, variant: str) -> dict:
  """Returns the size fields of `variant` for `modality`, e.g. ("audio", "base")."""
  if modality not in _FRONTENDS:
    raise ValueError(f"Unknown modality {modality!r}; known: {sorted(_FRONTENDS)}")
  if variant not in _TRANSFORMER:
    raise ValueError(f"Unknown variant {variant!r}; known: {sorted(_TRANSFORMER)}")
  return {**_TRANSFORMER[variant], **_FRONTENDS[modality][variant]}
