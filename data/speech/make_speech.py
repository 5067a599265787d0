"""Synthesises the small embedded speech sample set of d2v-jax with espeak-ng.

The set has two kinds of clip, all 16 kHz mono 16-bit FLAC under ``clips/``:

* ``word`` clips: one keyword out of ``WORDS`` (a keyword-spotting-like probe task with confusable
  pairs such as go/no, on/off, bed/bad, up/stop), spoken by many espeak-ng voices at random speed
  and pitch, with white, pink or brown noise at a random SNR, a random gain and random leading and
  trailing silence, so that a probe cannot solve it from energy or duration alone.
* ``sentence`` clips: short English sentences (traditional proverbs plus sentences built from
  templates written for this project) with exact upper-case transcripts, spoken by varied voices,
  speeds and pitches with light noise; they serve speech pretraining and CTC fine-tuning.

The split is speaker independent: a voice is ``<accent>+<variant>`` (for example
``en-gb-scotland+f3``) and a fixed, seeded quarter of the variants (the timbre: formants, pitch
range, voicing) is held out, so every ``test`` clip is spoken by a variant that no ``train`` clip
uses, in whichever accent.

It writes ``index.tsv`` next to the clips, with the tab-separated columns
``path num_samples kind split word transcript voice speed pitch`` (``path`` relative to the output
directory, ``word`` empty for sentences). The samples are a pure function of ``--seed`` and the
installed espeak-ng version (the committed set was made with espeak-ng 1.51 from Debian 12 and
``--seed 0``); the FLAC bytes may also vary with the libFLAC version.

Only this script needs espeak-ng (``apt-get install -y espeak-ng``); the project reads the FLAC
files with soundfile. Run it from anywhere with the project's Python::

  python data/speech/make_speech.py              # rewrites data/speech/clips and index.tsv
  python data/speech/make_speech.py --seed 1 --out-dir /tmp/speech
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050

# Keywords with confusable pairs (go/no, on/off, bed/bad, up/stop, left/yes, down/right).
WORDS = ("yes", "no", "go", "up", "down", "left", "right", "on", "off", "stop", "bed", "bad")

# espeak-ng accents (its own gmw voices; the mbrola ones need extra packages).
ACCENTS = (
  "en-us",
  "en-us-nyc",
  "en-gb",
  "en-gb-x-rp",
  "en-gb-scotland",
  "en-gb-x-gbclan",
  "en-gb-x-gbcwmd",
  "en-029",
)

# espeak-ng voice variants (files in espeak-ng-data/voices/!v), grouped so the held-out quarter
# has both groups. Robotic, echoing and whispering variants are left out.
FEMALE_VARIANTS = (
  "f1", "f2", "f3", "f4", "f5", "Andrea", "Annie", "anika", "aunty", "belinda", "grandma",
  "linda", "shelby", "steph", "zac",
)  # fmt: skip
MALE_VARIANTS = (
  "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "klatt", "klatt2", "klatt3", "klatt4",
  "Alex", "Denis", "Gene", "Jacky", "Mario", "Michael", "Mike", "Nguyen", "Storm", "adam",
  "announcer", "antonio", "benjamin", "boris", "croak", "david", "ed", "edward", "gustave",
  "grandpa", "iven", "john", "marcelo", "max", "michel", "norbert", "pablo", "paul", "pedro",
  "quincy", "rob", "robert", "sandro", "travis", "victor",
)  # fmt: skip
TEST_FRACTION = 0.25

# Signal chain ranges, each drawn uniformly per clip.
LEAD_TAIL_S = (0.0, 0.3)  # silence before and after the speech
WORD_SNR_DB = (0.0, 20.0)
SENTENCE_SNR_DB = (35.0, 50.0)
# Random gain: the peak after mixing, in dB below full scale. Low levels keep the FLAC files small
# (each 6 dB saves about one bit a sample) and still leave about 45 dB above the 16-bit
# quantisation noise; models normalise each utterance anyway.
PEAK_DBFS = (-42.0, -22.0)
NOISE_EXPONENTS = (0.0, 1.0, 2.0)  # white, pink and brown noise

# Traditional English proverbs (public domain).
PROVERBS = (
  "a stitch in time saves nine",
  "the early bird catches the worm",
  "all that glitters is not gold",
  "a friend in need is a friend indeed",
  "birds of a feather flock together",
  "don't count your chickens before they hatch",
  "every cloud has a silver lining",
  "look before you leap into the water",
  "many hands make light work",
  "rome was not built in a day",
  "the pen is mightier than the sword",
  "too many cooks spoil the broth",
  "two heads are better than one",
  "where there's a will there's a way",
  "you can't judge a book by its cover",
  "an apple a day keeps the doctor away",
  "absence makes the heart grow fonder",
  "don't put all your eggs in one basket",
  "it is never too late to learn",
  "a watched pot never boils",
  "the grass is always greener on the other side",
  "slow and steady wins the race",
  "a penny saved is a penny earned",
  "time and tide wait for no man",
  "a rolling stone gathers no moss",
  "honesty is the best policy",
  "don't cross the bridge until you come to it",
  "you can lead a horse to water",
  "the squeaky wheel gets the grease",
  "an old dog will learn no new tricks",
  "what goes up must come down",
  "better safe than sorry in the end",
)

# Vocabulary for the template sentences (written for this project).
NAMES = ("john", "mary", "peter", "anna", "david", "susan", "tom", "emma", "paul", "lucy")
ADJECTIVES = ("small", "big", "old", "young", "quiet", "happy", "tired", "clever", "brown", "red")
ANIMALS = ("dog", "cat", "horse", "bird", "fox", "rabbit", "cow", "sheep", "mouse", "duck")
OBJECTS = ("book", "cup", "chair", "box", "coat", "lamp", "key", "bottle", "basket", "letter")
PLACES = ("kitchen", "garden", "station", "market", "river", "school", "village", "forest")
COLOURS = ("green", "blue", "yellow", "white", "black", "grey", "orange", "purple")
RELATIVES = ("mother", "father", "sister", "brother", "uncle", "aunt", "friend", "neighbour")
ACTIVITIES = ("walk", "read", "swim", "sing", "paint", "cook", "fish", "dance")
SEASONS = ("spring", "summer", "autumn", "winter", "morning", "evening")
TIMES = ("today", "tomorrow", "next week", "on monday", "after lunch", "before dinner")
PAST_TIMES = ("yesterday", "last night", "last week", "this morning", "on sunday")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve")
VERBS_PAST = ("jumped", "walked", "ran", "looked", "climbed")
WEATHER = (("wind", "cold"), ("rain", "heavy"), ("sun", "warm"), ("snow", "deep"), ("sky", "clear"))

TEMPLATES = (
  "the {adj} {animal} {verb} over the {adj2} {obj}",
  "{name} put the {colour} {obj} in the {place}",
  "please bring me the {adj} {obj} from the {place}",
  "we will paint the {obj} {colour} {time}",
  "{name} said the {weather} was very {weather_adj} {past}",
  "can you see the {colour} {obj} near the {place}",
  "my {relative} likes to {activity} in the {season}",
  "there are {number} {animal}s in the {place} {past}",
  "{name} and {name2} will meet at the {place} {time}",
  "the {animal} {verb} to the {place} {past}",
  "i left my {colour} {obj} at the {place}",
  "{name} found {number} old {obj}s in the {place}",
  "her {relative} does not like to {activity} {time}",
  "the {weather} is {weather_adj} in the {season} here",
)

_VOCAB = {
  "name": NAMES, "name2": NAMES, "adj": ADJECTIVES, "adj2": ADJECTIVES, "animal": ANIMALS,
  "obj": OBJECTS, "place": PLACES, "colour": COLOURS, "relative": RELATIVES,
  "activity": ACTIVITIES, "season": SEASONS, "time": TIMES, "past": PAST_TIMES,
  "number": NUMBERS, "verb": VERBS_PAST,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip to synthesise.

  Attributes:
    path: output path relative to the output directory.
    kind: ``word`` or ``sentence``.
    split: ``train`` or ``test``.
    word: keyword label (lower case), empty for sentences.
    text: text given to espeak-ng (lower case, no punctuation but apostrophes).
    voice: espeak-ng voice, ``<accent>+<variant>``.
    speed: espeak-ng speed in words per minute.
    pitch: espeak-ng pitch (0-99).
    seed: seed for this clip's noise, silence and gain.
    snr_range: (low, high) SNR in dB for the added noise.
  """

  path: str
  kind: str
  split: str
  word: str
  text: str
  voice: str
  speed: int
  pitch: int
  seed: tuple[int, ...]
  snr_range: tuple[float, float]

  @property
  def transcript(self) -> str:
    """LibriSpeech-style transcript: upper-case letters, apostrophes and single spaces."""
    return " ".join(re.sub(r"[^A-Z' ]", " ", self.text.upper()).split())


def split_variants(seed: int) -> dict[str, str]:
  """Maps every voice variant to ``train`` or ``test`` (a seeded quarter of each group is test)."""
  rng = np.random.default_rng([seed, 1])
  splits = {}
  for group in (FEMALE_VARIANTS, MALE_VARIANTS):
    order = rng.permutation(len(group))
    num_test = round(TEST_FRACTION * len(group))
    for rank, i in enumerate(order):
      splits[group[i]] = "test" if rank < num_test else "train"
  return splits


def make_sentences(num_sentences: int, seed: int) -> list[str]:
  """Returns ``num_sentences`` distinct sentences: the proverbs, then seeded template fillings."""
  rng = np.random.default_rng([seed, 2])
  sentences = list(PROVERBS[:num_sentences])
  seen = set(sentences)
  while len(sentences) < num_sentences:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    fill = {key: values[int(rng.integers(len(values)))] for key, values in _VOCAB.items()}
    weather, weather_adj = WEATHER[int(rng.integers(len(WEATHER)))]
    if fill["name"] == fill["name2"] or fill["adj"] == fill["adj2"]:
      continue
    sentence = template.format(weather=weather, weather_adj=weather_adj, **fill)
    if sentence not in seen:
      seen.add(sentence)
      sentences.append(sentence)
  return sentences


def plan_clips(words_per_class: int, num_sentences: int, seed: int) -> list[Clip]:
  """Lists every clip with its voice, speed, pitch and split, reproducibly from ``seed``."""
  rng = np.random.default_rng([seed, 3])
  splits = split_variants(seed)
  variants = {
    split: sorted(v for v, s in splits.items() if s == split) for split in ("train", "test")
  }

  def pick_voice(split: str) -> str:
    accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
    variant = variants[split][int(rng.integers(len(variants[split])))]
    return f"{accent}+{variant}"

  clips = []
  num_test_words = round(TEST_FRACTION * words_per_class)
  for w, word in enumerate(WORDS):
    for i in range(words_per_class):
      split = "test" if i < num_test_words else "train"
      clips.append(
        Clip(
          path=f"clips/w{len(clips):04d}.flac",
          kind="word",
          split=split,
          word=word,
          text=word,
          voice=pick_voice(split),
          speed=int(rng.integers(120, 211)),
          pitch=int(rng.integers(20, 81)),
          seed=(seed, 4, w, i),
          snr_range=WORD_SNR_DB,
        )
      )
  sentences = make_sentences(num_sentences, seed)
  order = rng.permutation(num_sentences)
  num_test_sentences = round(TEST_FRACTION * num_sentences)
  for rank, s in enumerate(order):
    split = "test" if rank < num_test_sentences else "train"
    clips.append(
      Clip(
        path=f"clips/s{int(s):04d}.flac",
        kind="sentence",
        split=split,
        word="",
        text=sentences[s],
        voice=pick_voice(split),
        speed=int(rng.integers(130, 201)),
        pitch=int(rng.integers(20, 81)),
        seed=(seed, 5, int(s)),
        snr_range=SENTENCE_SNR_DB,
      )
    )
  clips.sort(key=lambda c: c.path)
  return clips


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """Runs espeak-ng and returns its float waveform at ``ESPEAK_RATE``."""
  with tempfile.TemporaryDirectory() as tmp:
    wav = os.path.join(tmp, "out.wav")
    subprocess.run(
      ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav, text],
      check=True,
      capture_output=True,
    )
    audio, rate = sf.read(wav, dtype="float64")
  if rate != ESPEAK_RATE:
    raise ValueError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
  return audio if audio.ndim == 1 else audio.mean(axis=1)


def trim(audio: np.ndarray, rel_threshold: float = 0.01, margin: int = 160) -> np.ndarray:
  """Cuts leading and trailing near-silence, keeping ``margin`` samples either side."""
  loud = np.flatnonzero(np.abs(audio) > rel_threshold * np.abs(audio).max())
  return audio[max(loud[0] - margin, 0) : loud[-1] + margin + 1]


def speech_power(audio: np.ndarray, frame: int = 320) -> float:
  """Mean power over the active 20 ms frames (those within 20 dB of the loudest)."""
  num_frames = len(audio) // frame
  power = np.mean(audio[: num_frames * frame].reshape(num_frames, frame) ** 2, axis=1)
  return float(power[power > 0.01 * power.max()].mean())


def coloured_noise(rng: np.random.Generator, length: int, exponent: float) -> np.ndarray:
  """Unit-power noise with spectrum ``1 / f**exponent`` above 40 Hz (0 white, 1 pink, 2 brown)."""
  spectrum = np.fft.rfft(rng.standard_normal(length))
  freqs = np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE)
  scale = np.zeros_like(freqs)
  band = freqs >= 40.0
  scale[band] = freqs[band] ** (-exponent / 2)
  noise = np.fft.irfft(spectrum * scale, n=length)
  return noise / np.sqrt(np.mean(noise**2))


def render(clip: Clip) -> np.ndarray:
  """Synthesises ``clip`` and returns it as int16 samples at ``SAMPLE_RATE``."""
  rng = np.random.default_rng(list(clip.seed))
  speech = trim(espeak(clip.text, clip.voice, clip.speed, clip.pitch))
  speech = signal.resample_poly(speech, SAMPLE_RATE // 50, ESPEAK_RATE // 50)
  speech /= np.abs(speech).max()
  lead, tail = (int(x) for x in rng.uniform(*LEAD_TAIL_S, size=2) * SAMPLE_RATE)
  audio = np.concatenate([np.zeros(lead), speech, np.zeros(tail)])
  snr_db = rng.uniform(*clip.snr_range)
  exponent = float(rng.choice(NOISE_EXPONENTS))
  noise = coloured_noise(rng, len(audio), exponent)
  audio += noise * np.sqrt(speech_power(speech) / 10 ** (snr_db / 10))
  peak_db = rng.uniform(*PEAK_DBFS)
  audio *= 10 ** (peak_db / 20) / np.abs(audio).max()
  return np.round(audio * 32767).astype(np.int16)


def write_clip(clip: Clip, out_dir: Path) -> int:
  """Renders ``clip`` to FLAC under ``out_dir`` and returns its number of samples."""
  audio = render(clip)
  sf.write(
    out_dir / clip.path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC", compression_level=1.0
  )
  return len(audio)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--words-per-class", type=int, default=40)
  parser.add_argument("--num-sentences", type=int, default=120)
  parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args()

  if shutil.which("espeak-ng") is None:
    raise SystemExit("espeak-ng is not installed (apt-get install -y espeak-ng)")
  clips = plan_clips(args.words_per_class, args.num_sentences, args.seed)
  clip_dir = args.out_dir / "clips"
  if clip_dir.exists():
    shutil.rmtree(clip_dir)
  clip_dir.mkdir(parents=True)
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    lengths = list(pool.map(lambda c: write_clip(c, args.out_dir), clips))

  header = ("path", "num_samples", "kind", "split", "word", "transcript", "voice", "speed", "pitch")
  rows = ["\t".join(header)]
  for clip, length in zip(clips, lengths, strict=True):
    fields = (clip.path, length, clip.kind, clip.split, clip.word, clip.transcript, clip.voice,
              clip.speed, clip.pitch)  # fmt: skip
    rows.append("\t".join(str(f) for f in fields))
  (args.out_dir / "index.tsv").write_text("\n".join(rows) + "\n")

  for kind in ("word", "sentence"):
    for split in ("train", "test"):
      n = [x for c, x in zip(clips, lengths) if c.kind == kind and c.split == split]
      print(f"{kind:8s} {split:5s} {len(n):4d} clips {sum(n) / SAMPLE_RATE:7.1f} s")


if __name__ == "__main__":
  main()
