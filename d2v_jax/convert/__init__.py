"""Checkpoint converters from other frameworks to d2v-jax parameter trees (spec §4).

- `hf_audio`: HF transformers `Data2VecAudioModel` (state dict + config dict) -> our audio model.
- `hf_image`: HF transformers `Data2VecVisionModel` (state dict + config dict) <-> our image model.
- `hf_text`: HF transformers `Data2VecTextModel` / `RobertaModel` (state dict + config dict) <->
  our text model.
- `common`: what the three share: `ConversionError` (one class for every converter), the HF key
  table (`KeyTable`), the state-dict check and its error report, completing a converted tree from
  `init_params`, and the export.

Converters are pure numpy: torch is never imported, so they run wherever d2v-jax does. Loading a
checkpoint into numpy arrays (e.g. with `safetensors.numpy.load_file`) is the caller's job.
"""
