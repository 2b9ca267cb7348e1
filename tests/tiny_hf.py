"""Tiny random Llama-family checkpoints saved by transformers' PyTorch models (needs torch),
and ftlib forward passes to compare them with."""

import functools

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ftlib.hf import load_pretrained
from ftlib.models.llama import from_pretrained

ARCH = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@functools.cache
def smollm2_tokenizer():
    """The shipped SmolLM2 tokenizer: real text and single-token label words for RT runs."""
    return load_pretrained("smollm2-135m-instruct", weights=False).tokenizer


def hf_model(model_type="llama", vocab_size=256, seed=0, **overrides):
    """A random fp32 causal LM whose every weight (norms and biases too) is non-trivial."""
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=vocab_size, **{**ARCH, **overrides}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, path, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    smollm2_tokenizer().save_pretrained(path)
    return path


def hf_logits(model, ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids_BT).long()).logits.numpy()


def ftlib_model(path):
    src = load_pretrained(str(path))
    return from_pretrained(src.hf_config, src.tensors)


def ftlib_logits(model, ids_BT: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids_BT)))


def token_ids(vocab_size: int, shape=(2, 11), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)
