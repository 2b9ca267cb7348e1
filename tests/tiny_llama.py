"""The random-init Llama most unit tests build: two layers, grouped-query attention (4
heads sharing 2 KV heads), compiled in seconds on a CPU. Tests that need another shape
derive it with dataclasses.replace, so the differences are the ones they state."""

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
