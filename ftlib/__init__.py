"""ftlib: fine-tuning research for large language models in JAX / Flax NNX."""
