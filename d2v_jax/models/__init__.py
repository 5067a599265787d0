"""Flax encoders: shared transformer blocks plus one front end per modality."""
