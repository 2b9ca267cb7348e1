"""Prompt tuning (Lester et al. 2021): N trainable soft-token embeddings
prepended to the input, installed as the model's `prompt` hook.

Initialised like HF PEFT's TEXT init from `init_token_ids`, or from `init_text`,
which the trainer tokenizes into those ids (`ftlib.peft.resolve_init_texts`); the ids repeat
or are cut to N. Otherwise from the embeddings of N random
vocabulary tokens (PEFT's SAMPLE_VOCAB), which keeps them in the embedding
distribution. The soft tokens take positions 0..N-1 and the input N.., as in PEFT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlib.errors import FtlibError


class SoftPrompt(nnx.Module):
    def __init__(self, init_ND):
        self.embedding = nnx.Param(init_ND, logical_axes=("prompt", "embed"))

    def __call__(self):
        """-> soft_ND."""
        return self.embedding[...]


def init_ids(token_ids, n: int, vocab_size: int, rngs: nnx.Rngs, method: str = "prompt"):
    """N token ids to initialise from: `token_ids` repeated or cut to N, or N random ones."""
    if not len(token_ids):
        return jax.random.randint(rngs.params(), (n,), 0, vocab_size)
    ids = np.asarray(token_ids, np.int64)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise FtlibError(
            f"peft.{method}.init_token_ids must lie in [0, {vocab_size}), "
            f"got {ids.min()}..{ids.max()}"
        )
    return jnp.asarray(np.resize(ids, n))  # repeats a short list, cuts a long one


def check_text_resolved(c, method: str) -> None:
    if c.get("init_text") and not c.init_token_ids:
        raise FtlibError(
            f"peft.{method}.init_text is tokenized by the trainer "
            f"(ftlib.peft.resolve_init_texts); outside it, give peft.{method}.init_token_ids"
        )


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.prompt
    check_text_resolved(c, "prompt")
    if getattr(model, "prompt", False) is not None:
        raise FtlibError(f"{type(model).__name__} has no free prompt hook for peft method 'prompt'")
    if c.num_virtual_tokens <= 0:
        raise FtlibError(f"peft.prompt.num_virtual_tokens must be > 0, got {c.num_virtual_tokens}")
    table_VD = model.token_embeddings()
    ids_N = init_ids(c.init_token_ids, c.num_virtual_tokens, table_VD.shape[0], rngs)
    model.prompt = SoftPrompt(jnp.take(table_VD, ids_N, axis=0))


# Only the soft tokens train.
TRAINABLE_RULES = ((r"prompt/embedding", True), (r".*", False))
OPTIONS = ("num_virtual_tokens", "init_token_ids", "init_text")
