"""Shared config helpers: big_vision-style argument parsing and defaults used by every modality.

A config file's `get_config(arg)` takes one string such as `variant=base,runlocal` (passed after a
colon on the command line: `--config=configs/audio.py:variant=base`). `parse_arg` turns it into a
ConfigDict with typed defaults, so a misspelt key fails instead of being ignored.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,flag` into a ConfigDict; keys must appear in `defaults`.

  A bare `flag` sets a boolean default to True. Values take the type of their default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...)")
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value)
  return parsed


def versioned_config(arg, version1, version2, variants, note: str = ""):
  """The config of `variant=...,version=1|2`: `version1(variant)`, and for data2vec 2.0
  `version2(that config, variant)`, which keeps its data, probe and loop groups."""
  arg = parse_arg(arg, variant="tiny", version=1)
  if arg.version not in (1, 2):
    raise ValueError(f"version={arg.version}: use 1 (data2vec) or 2 (data2vec 2.0)")
  if arg.variant not in variants:
    raise ValueError(f"Unknown variant {arg.variant!r}; known: {sorted(variants)}{note}")
  config = version1(arg.variant)
  return config if arg.version == 1 else version2(config, arg.variant)


def execution_fields() -> dict:
  """`config.model` fields that change how the step runs, not what it computes (issue 7)."""
  return dict(
    # Compute dtype of the encoders ("bfloat16" on accelerators). Parameters, optimizer state,
    # targets, their normalisation and the loss stay float32.
    dtype="float32",
    remat="none",  # "full" | "dots": recompute block activations in the backward pass
    fused_attention=False,  # jax.nn.dot_product_attention (cuDNN on GPUs) where no dropout
  )


def v2_model(variant: str, *, dropout: float, norm_eps: float, decoder: dict, **fields):
  """`config.model` of a data2vec 2.0 config (spec §2.3): the fields every modality has, then
  the modality's `fields`. `dropout` is the blocks' residual and attention dropout."""
  return ml_collections.ConfigDict(
    dict(
      variant=variant,
      prenet_depth=fields.pop("prenet_depth", 0),  # the first of num_layers blocks
      dropout=dropout,
      attention_dropout=dropout,
      activation_dropout=0.0,
      drop_path_rate=0.0,
      norm_eps=norm_eps,
      mask_noise_std=0.01,  # N(0, σ²) decoder inputs at masked positions
      decoder=decoder,
      **execution_fields(),
      **fields,
    )
  )


def v2_decoder(
  dim, kernel, layers, *, groups=16, residual=True, projection_layers=1, input_dropout
):
  """`config.model.decoder`: the conv decoder's width, kernel, depth, groups, residual, the
  projection's Linear count and the dropout on its input (spec §2.1.8, §2.3)."""
  return dict(
    dim=dim,
    kernel=kernel,
    groups=groups,
    layers=layers,
    residual=residual,
    projection_layers=projection_layers,
    input_dropout=input_dropout,
  )


def v2_ema(ema: tuple[float, float, int], teacher_params: tuple[str, ...]):
  """`config.ema` of data2vec 2.0: τ anneals start -> end over `ema[2]` updates; the teacher
  mirrors `teacher_params` (the rest is shared or, the decoder, the student's alone)."""
  start, end, anneal = ema
  return ml_collections.ConfigDict(
    dict(
      decay=start, end_decay=end, anneal_steps=anneal, teacher_params=teacher_params, copy_params=()
    )
  )


def v2_targets(top_k: int, final_norm: str):
  """`config.targets` of data2vec 2.0: FFN outputs of the top-K main blocks, instance norm each,
  averaged, then `final_norm` (spec §2.1.5)."""
  return ml_collections.ConfigDict(dict(top_k=top_k, layer_norm="instance", final_norm=final_norm))


def loop_config(total_steps: int) -> ml_collections.ConfigDict:
  """Training-loop defaults shared by pretraining and fine-tuning."""
  return ml_collections.ConfigDict(
    dict(
      total_steps=total_steps,
      log_every=50,  # steps between log lines / JSONL / TensorBoard rows
      checkpoint_every=200,  # steps between checkpoints (and one at the end)
      keep_checkpoints=2,
      collapse_check_after=5000,  # spec §0.7: abort on target collapse after this many updates
      min_target_std=0.1,
      min_pred_std=0.01,
      progress_bar=True,
      # The device mesh (d2v_jax/sharding.py): `fsdp` devices share each large state array
      # (student, teacher, Adam moments), the other axis is data parallel; 1 = pure data
      # parallelism. Arrays under `fsdp_min_mb` MiB stay replicated.
      fsdp=1,
      fsdp_min_mb=4.0,
      # Gradient accumulation (d2v_jax/accumulate.py): each batch in this many sequential
      # slices, one update; for a global batch that does not fit the devices at once.
      micro_batches=1,
      # jax.profiler trace of steps profile_first_step .. +profile_steps-1 into
      # <workdir>/profile (TensorBoard's profile plugin or Perfetto read it); 0 = no trace.
      profile_first_step=0,
      profile_steps=5,
    )
  )


def extract_config() -> ml_collections.ConfigDict:
  """`mode=extract`: every layer's features of the work directory's model for a set of inputs."""
  return ml_collections.ConfigDict(
    dict(
      input="",  # audio folder or manifest .tsv, image folder, or a text file (one per line)
      output="",  # directory for one .npz (or .npy) per input and index.tsv
      layers="all",  # all | last | comma-separated indices (0 = the encoder input)
      format="npz",  # npz | npy
      batch_size=8,
    )
  )


def finetune_config(pretrain: ml_collections.ConfigDict, total_steps: int):
  """The groups every fine-tuning config shares, built on its modality's pretraining config.

  `config.model` starts as the pretraining model's; with `config.init.pretrained` set, its sizes
  are replaced by the pretraining run's when the run starts (`pretrained.merge_model_config`),
  so only training fields (dropouts, drop path, layerdrop) need setting here.
  """
  config = ml_collections.ConfigDict()
  config.mode = "finetune"
  config.modality = pretrain.modality
  config.version = pretrain.version
  config.seed = 0
  # A pretraining work directory (newest checkpoint) or one checkpoint step directory in it;
  # "" trains from a random initialisation (the log says so).
  config.init = ml_collections.ConfigDict(dict(pretrained=""))
  config.model = pretrain.model
  config.loop = loop_config(total_steps)
  config.eval = ml_collections.ConfigDict(dict(every=0, split="test"))
  return config


def probe_config(*, every: int, batch_size: int, **fields) -> ml_collections.ConfigDict:
  """`config.probe`: the linear and kNN probes on the modality's embedded labelled set, run every
  `every` updates and at the end (`d2v_jax/evaluate.py`)."""
  return ml_collections.ConfigDict(
    dict(
      enabled=True,
      every=every,
      seeds=(0, 1, 2),  # each draws the held-out part that chooses the linear probe's L2
      batch_size=batch_size,  # probe examples per encoder call
      # L2 strengths the linear probe chooses from (times the sum of squared weights, on
      # standardised features and mean cross-entropy). Weaker ones were not chosen on the text
      # probe's features and converge slowest.
      l2_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
      knn_k=20,  # kNN probe: neighbours and vote temperature (DINO's)
      knn_temperature=0.07,
      **fields,
    )
  )
