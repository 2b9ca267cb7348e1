"""Prompt tuning (Lester et al. 2021): N trainable soft-token embeddings
prepended to the input, installed as the model's `prompt` hook.

Initialised like HF PEFT's TEXT init from `init_token_ids`, or from `init_text`,
which the trainer tokenizes into those ids (`resolve_init_text`); the ids repeat
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


def init_ids(token_ids, n: int, vocab_size: int, rngs: nnx.Rngs):
    """N token ids whose embeddings initialise the prompt."""
    if not len(token_ids):
        return jax.random.randint(rngs.params(), (n,), 0, vocab_size)
    ids = np.asarray(token_ids, np.int64)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise FtlibError(
            f"peft.prompt.init_token_ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}"
        )
    return jnp.asarray(np.resize(ids, n))  # repeats a short list, cuts a long one


def resolve_init_text(cfg, tokenizer) -> None:
    """Sets peft.prompt.init_token_ids to the tokens of peft.prompt.init_text (no
    special tokens, as PEFT's TEXT init), so the run's saved config holds both."""
    c = cfg.prompt
    if not c.get("init_text"):
        return
    ids = tuple(int(i) for i in tokenizer(c.init_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FtlibError(f"peft.prompt.init_text {c.init_text!r} has no tokens")
    if c.init_token_ids and tuple(c.init_token_ids) != ids:
        raise FtlibError(
            "peft.prompt.init_text and peft.prompt.init_token_ids disagree: set only one"
        )
    c.init_token_ids = ids


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.prompt
    if c.get("init_text") and not c.init_token_ids:
        raise FtlibError(
            "peft.prompt.init_text is tokenized by the trainer (prompt.resolve_init_text); "
            "outside it, give peft.prompt.init_token_ids"
        )
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
