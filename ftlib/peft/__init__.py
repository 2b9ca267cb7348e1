"""PEFT methods: each is model surgery + ordered trainable rules.

A method module exposes `apply(model, cfg, rngs)` (in-place surgery; `cfg` is
`config.peft`) and `TRAINABLE_RULES`, ordered (regex over the param path,
trainable) pairs; the first match wins. Adding a method = one file + one line.
"""

from __future__ import annotations

from flax import nnx

from ftlib import masks
from ftlib.errors import FtlibError
from ftlib.peft import full, lora

METHODS = {
    "full": full,
    "lora": lora,
}


def get_method(name: str):
    if name not in METHODS:
        raise FtlibError(f"unknown peft.method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def apply_method(model: nnx.Module, peft_cfg, seed: int = 0) -> masks.Mask:
    """Runs the method's surgery on `model` and returns its trainable mask.
    User rules come first: `peft.freeze` regexes freeze, `peft.trainable` unfreeze."""
    method = get_method(peft_cfg.method)
    method.apply(model, peft_cfg, nnx.Rngs(seed))
    rules = (
        [(r, False) for r in peft_cfg.freeze]
        + [(r, True) for r in peft_cfg.trainable]
        + list(method.TRAINABLE_RULES)
    )
    return masks.build_mask(model, rules)
