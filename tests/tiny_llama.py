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


def label_word_examples(n, choices, *, longest_prompt=20, every_token=False, seed=0, cfg=CFG):
    """n label-word classification examples as ftlib.data.tokenize makes them: a prompt
    of 2..longest_prompt random tokens, then the label word (choices[label]), the only
    loss token, or with every_token all of them (text data with no leading special
    token: a packed row must not score a segment's first token from the one before)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(2))
        prompt = rng.integers(10, cfg.vocab_size, rng.integers(2, longest_prompt + 1))
        ids = np.append(prompt, choices[label]).astype(np.int32)
        loss_mask = np.full(len(ids), int(every_token), np.int32)
        loss_mask[-1] = 1
        out.append(dict(input_ids=ids, loss_mask=loss_mask, label=label, choice_pos=len(ids) - 2))
    return out
