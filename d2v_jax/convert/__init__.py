"""Checkpoint converters: HF transformers and fairseq / BEiT checkpoints <-> d2v-jax (spec §4).

- `hf_audio`, `hf_image`, `hf_text`: one HF architecture each (`Data2Vec*Model`, and the task
  heads we implement: CTC, image classification, text sequence classification), both ways.
- `hf`: the front door for HF checkpoints of any modality: picks the converter and builds our
  pretraining or fine-tuning model.
- `fairseq_v1`: released data2vec 1.0 fairseq (speech, text) and BEiT (vision) state dicts renamed
  to HF names, with the EMA teacher, so that the HF converters do the rest.
- `files`: reading HF directories (safetensors) and PyTorch pickles (`torch_pickle`: tensors and
  configs only, without torch); writing HF directories.
- `workdir`: a converted checkpoint as a d2v-jax work directory, and a run back to HF;
  `python -m d2v_jax.convert import|export` (`__main__`).
- `common`: what the converters share: `ConversionError`, the key tables, the state-dict check
  that lists every offending key, and the export.

The converters are pure numpy: torch is never imported.
"""
