"""Checkpoint converters from other frameworks to d2v-jax parameter trees (spec §4).

- `hf_audio`: HF transformers `Data2VecAudioModel` (state dict + config dict) -> our audio model.
- `hf_image`: HF transformers `Data2VecVisionModel` (state dict + config dict) <-> our image model.

Converters are pure numpy: torch is never imported, so they run wherever d2v-jax does. Loading a
checkpoint into numpy arrays (e.g. with `safetensors.numpy.load_file`) is the caller's job.
"""
