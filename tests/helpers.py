"""Shared tiny setups for the core tests.

XLA compilation dominates on CPU (the feature extractor's truncated-normal init alone compiles for
~15 s), so the model, its parameters and the jitted train step are built once per session and
shared by every test module through `functools.cache`. Helper computations that are not the
train step itself compile with LLVM optimisations off (`fast_jit`): several times faster to
compile, same results up to float rounding.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import audio as audio_config
from configs import image as image_config
from configs import text as text_config
from d2v_jax import checkpoint, optim, sharding, steps, teacher, train
from d2v_jax.data import text as text_data
from d2v_jax.data import text_corpus, tokenizer
from d2v_jax.models.data2vec import build_model
from d2v_jax.state import TrainState

# 2 layers, width 32, 4 heads, conv width 16; pos-conv groups stay 16 (32 % 16 == 0).
# The 5-layer positional conv of base/large, so the deep pos conv stays covered.
TINY_SIZES = dict(
  num_layers=2, dim=32, num_heads=4, mlp_dim=64, conv_dim=16, pos_conv_depth=5, pos_conv_kernel=19
)
INIT_LENGTH = 400  # one frame: the cheapest input that runs every layer
STEP_LENGTH = 16000  # 49 frames
STEP_VALID = (16000, 12000, 9000, 16000)  # valid samples per row of the step batch (37, 27 frames)
STEP_TOTAL = 60  # schedule length of the step config
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, **kwargs):
  """`jax.jit` with cheap CPU code generation, for test-side computations."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def tiny_config() -> ml_collections.ConfigDict:
  """The audio config with the tiny sizes above (size fields override the variant's)."""
  config = audio_config.get_config()
  config.model.unlock()
  config.model.update(TINY_SIZES)
  config.targets.top_k = 2
  return config


def step_config() -> ml_collections.ConfigDict:
  """`tiny_config` tuned so that a fixed batch is clearly fitted within ~40 steps."""
  config = tiny_config()
  config.loop.total_steps = STEP_TOTAL
  config.input.batch_size = len(STEP_VALID)
  config.input.crop_lengths = (STEP_LENGTH,)
  config.optim.lr = 5e-3
  # A faster EMA than the paper's, so the teacher visibly moves; still annealed over the run.
  config.ema.decay = 0.99
  config.ema.end_decay = 0.999
  config.ema.anneal_steps = 40
  return config


@functools.cache
def tiny_model():
  return build_model("audio", tiny_config().model)


@functools.cache
def tiny_params():
  """Parameters of `tiny_model()` from its real initialisers (key 0)."""
  model = tiny_model()
  x = jnp.zeros((1, INIT_LENGTH), jnp.float32)
  pad = jnp.zeros((1, INIT_LENGTH), bool)
  params = fast_jit(lambda: model.init({"params": jax.random.key(0)}, x, pad, train=False))()
  return params["params"]


def speech_like(rng: np.random.Generator, valid_lengths, total: int):
  """Harmonic tones plus noise, normalised per row over valid samples, zero in the padding.

  Returns (audio float32[B, total], padding_mask bool[B, total]).
  """
  t = np.arange(total) / 16000.0
  audio = np.zeros((len(valid_lengths), total), np.float32)
  for i, n in enumerate(valid_lengths):
    f0 = rng.uniform(100, 300)
    wave = sum(np.sin(2 * np.pi * f0 * h * t[:n] + rng.uniform(0, 6)) / h for h in range(1, 6))
    wave = wave * (1 + 0.5 * np.sin(2 * np.pi * 3 * t[:n])) + 0.1 * rng.standard_normal(n)
    audio[i, :n] = (wave - wave.mean()) / wave.std()
  padding = np.arange(total)[None, :] >= np.asarray(valid_lengths)[:, None]
  return audio, padding


@functools.cache
def step_batch():
  audio, padding = speech_like(np.random.default_rng(0), STEP_VALID, STEP_LENGTH)
  return {"audio": audio, "padding_mask": padding}


class TrainSetup:
  """Model, optimiser, initial state and a jitted step on a mesh, as `d2v_jax/train.py` builds.

  Defaults to the tiny audio setup; the image tests pass their own config, model and params.
  """

  def __init__(self, devices, config=None, model=None, params=None):
    self.config = step_config() if config is None else config
    self.model = tiny_model() if model is None else model
    self.tx, self.schedule = optim.make_optimizer(self.config.optim, self.config.loop.total_steps)
    self.mesh = sharding.make_mesh(devices)
    self.replicated = sharding.replicated(self.mesh)
    params = tiny_params() if params is None else params
    state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      teacher=teacher.init_teacher(params, tuple(self.config.ema.teacher_params)),
      opt_state=self.tx.init(params),
    )
    self.state0 = jax.device_put(state, self.replicated)
    self.loop_key = jax.device_put(jax.random.key(1), self.replicated)
    self.num_traces = 0
    step_fn = steps.make_pretrain_step(self.model, self.tx, self.schedule, self.config)

    def counted(state, batch, loop_key):
      self.num_traces += 1  # runs once per trace, never at execution
      return step_fn(state, batch, loop_key)

    self.step = jax.jit(
      counted,
      in_shardings=(self.replicated, sharding.batch_sharded(self.mesh), self.replicated),
      out_shardings=(self.replicated, self.replicated),
    )

  def put(self, batch):
    return sharding.put_batch(batch, self.mesh)

  def run(self, batch, num_steps: int, state=None):
    """Runs `num_steps` steps on one fixed batch; returns (state, list of metrics on host)."""
    state = self.state0 if state is None else state
    batch = self.put(batch)
    history = []
    for _ in range(num_steps):
      state, metrics = self.step(state, batch, self.loop_key)
      history.append(jax.device_get(metrics))
    return state, history


@functools.cache
def train_setup(num_devices: int = 4) -> TrainSetup:
  return TrainSetup(jax.devices()[:num_devices])


# Images: 2 blocks of width 32 on 16² images cut into 4×4 patches (a 4×4 grid).
IMAGE_SIZES = dict(num_layers=2, dim=32, num_heads=4, mlp_dim=64, image_size=16, patch_size=4)
IMAGE_BATCH = 8


def image_step_config() -> ml_collections.ConfigDict:
  """The image config at IMAGE_SIZES, tuned so that a fixed batch is clearly fitted."""
  config = image_config.get_config()
  config.model.update(IMAGE_SIZES)
  config.targets.top_k = 2
  config.loop.total_steps = STEP_TOTAL
  config.input.batch_size = IMAGE_BATCH
  config.optim.update(lr=5e-3, warmup_steps=5)
  config.ema.update(decay=0.99, end_decay=0.99)  # constant, fast enough to see the teacher move
  return config


@functools.cache
def image_model():
  return build_model("image", image_step_config().model)


@functools.cache
def image_params():
  model = image_model()
  x = jnp.zeros((1, IMAGE_SIZES["image_size"], IMAGE_SIZES["image_size"], 3), jnp.float32)
  return fast_jit(lambda: model.init({"params": jax.random.key(0)}, x, None)["params"])()


@functools.cache
def image_batch():
  """Per image: a random colour plus a gentle random colour ramp, and a little noise.

  Masked patches are then predictable from the visible ones (patches of one image are alike),
  so a student that uses its context can fit the targets; independent random patches could not.
  """
  rng = np.random.default_rng(0)
  size = IMAGE_SIZES["image_size"]
  ramp = np.linspace(-1, 1, size, dtype=np.float32)
  colour = rng.standard_normal((IMAGE_BATCH, 1, 1, 3))
  slope_y, slope_x = 0.5 * rng.standard_normal((2, IMAGE_BATCH, 1, 1, 3))
  images = colour + slope_y * ramp[None, :, None, None] + slope_x * ramp[None, None, :, None]
  images += 0.1 * rng.standard_normal(images.shape)
  return {"image": images.astype(np.float32)}


@functools.cache
def image_train_setup(num_devices: int = 4) -> TrainSetup:
  return TrainSetup(jax.devices()[:num_devices], image_step_config(), image_model(), image_params())


def flat(tree):
  """{'a/b/c': np.ndarray} of a parameter pytree."""
  from flax import traverse_util

  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# Text: 2 blocks of width 32 over the embedded tokenizer's vocabulary, blocks of 32 tokens.
TEXT_SIZES = dict(num_layers=2, dim=32, num_heads=4, mlp_dim=64)
TEXT_LENGTH = 32
TEXT_BATCH = 8


def text_step_config(scheme: str = "span") -> ml_collections.ConfigDict:
  """The text config at TEXT_SIZES, tuned so that a fixed batch is clearly fitted."""
  config = text_config.get_config()
  config.model.update(TEXT_SIZES)
  config.input.max_length = TEXT_LENGTH
  config.input.batch_size = TEXT_BATCH
  config.masking.scheme = scheme
  config.targets.top_k = 2
  config.loop.total_steps = STEP_TOTAL
  config.optim.update(lr=5e-3, warmup_steps=5)
  config.ema.update(decay=0.99, end_decay=0.999, anneal_steps=40)
  train.complete_config(config)  # the embedded tokenizer's vocabulary and <mask> id
  return config


@functools.cache
def text_model():
  return build_model("text", text_step_config().model)


@functools.cache
def text_params():
  model = text_model()
  tokens = jnp.zeros((1, TEXT_LENGTH), jnp.int32)
  return fast_jit(
    lambda: model.init({"params": jax.random.key(0)}, tokens, tokens == 1)["params"]
  )()


@functools.cache
def text_batch():
  """Eight verses of the embedded corpus as `<s> verse </s> <pad>...` rows."""
  verses = text_corpus.load_embedded_probe_set("train").texts[:TEXT_BATCH]
  tokens, padding = text_data.encode_for_probe(
    verses, tokenizer.load_embedded_tokenizer(), TEXT_LENGTH
  )
  return {"tokens": tokens, "padding_mask": padding}


@functools.cache
def text_train_setup(num_devices: int = 4) -> TrainSetup:
  return TrainSetup(jax.devices()[:num_devices], text_step_config(), text_model(), text_params())


def save_pretraining_checkpoint(workdir, config, params, *, with_config: bool = True):
  """A pretraining checkpoint of `params` at step 1, as `train_and_evaluate` writes one."""
  ckpt = checkpoint.Checkpointer(workdir, config)
  data_iterator = iter(grain.MapDataset.range(2).to_iter_dataset())
  ckpt.save(1, {"params": params, "step": np.int32(1)}, data_iterator)
  ckpt.wait()
  if with_config:
    train.write_config(workdir, config)
  return workdir
