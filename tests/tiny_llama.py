"""The random-init Llama most unit tests build: two layers, grouped-query attention (4
heads sharing 2 KV heads), compiled in seconds on a CPU. Tests that need another shape
derive it with dataclasses.replace, so the differences are the ones they state."""

import numpy as np

from ftlib.models.llama import LlamaConfig

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def batch(seed=0, cfg=CFG, B=4, T=16):
    """A train-step batch for steps.make_train_step: B unpadded rows of T random token ids
    below cfg's vocabulary, every token scored."""
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return dict(
        input_ids=ids,
        loss_mask=np.ones_like(ids),
        segment_ids=np.ones_like(ids),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    )
