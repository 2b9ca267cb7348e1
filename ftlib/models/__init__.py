"""Model construction from config.model: a pretrained checkpoint or a seeded
random init (with the tokenizer of a named checkpoint)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models.llama import Llama, LlamaConfig, from_pretrained

# config.model fields that describe a random-init architecture.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig))
# Execution knobs that also apply to pretrained models.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat")


def build_model(model_cfg, seed: int):
    """-> (model, tokenizer). config.model.checkpoint: HF folder, .gguf file or
    shipped asset name; empty = random init of the architecture in config.model
    with the tokenizer of config.model.tokenizer."""
    from ftlib.hf import load_pretrained

    runtime = {k: model_cfg[k] for k in RUNTIME_FIELDS}
    if model_cfg.checkpoint:
        source = load_pretrained(model_cfg.checkpoint)
        if source.hf_config.get("model_type", "llama") != "llama":
            raise FtlibError(
                f"config.model.checkpoint {model_cfg.checkpoint!r} is a "
                f"{source.hf_config['model_type']} model; the causal-LM trainer needs llama"
            )
        return from_pretrained(source.hf_config, source.tensors, **runtime), source.tokenizer
    if not model_cfg.tokenizer:
        raise FtlibError("config.model: set checkpoint (pretrained) or tokenizer (random init)")
    tokenizer = load_pretrained(model_cfg.tokenizer, weights=False).tokenizer
    fields = {k: model_cfg[k] for k in ARCH_FIELDS if k in model_cfg}
    fields["vocab_size"] = fields.get("vocab_size") or len(tokenizer)
    fields["head_dim"] = fields.get("head_dim") or fields["hidden_size"] // fields["num_heads"]
    return Llama(LlamaConfig(**fields), rngs=nnx.Rngs(seed)), tokenizer
