"""d2v-jax: data2vec (v1 and 2.0) self-supervised learning for speech, images and text."""

__version__ = "0.1.0"
