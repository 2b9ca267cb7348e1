"""PEFT methods: each is model surgery + ordered trainable rules.

A method module exposes `apply(model, cfg, rngs)` (in-place surgery; `cfg` is
`config.peft`), `TRAINABLE_RULES`, ordered (regex over the param path,
trainable) pairs where the first match wins (or a function of `config.peft`
returning them, when options change them), and `OPTIONS`, the fields of its
`config.peft.<name>` block. Adding a method = one file + one line.
Methods compose: 'lora+prompt' (see ftlib.peft.compose).
"""

from __future__ import annotations

from flax import nnx

from ftlib import masks
from ftlib.errors import FtlibError
from ftlib.peft import adapter, bitfit, compose, dora, full, ia3, lora, prefix, prompt
from ftlib.peft.merging import merge, unmerge  # noqa: F401 (the package API)

METHODS = {
    "full": full,
    "lora": lora,
    "dora": dora,
    "ia3": ia3,
    "adapter": adapter,
    "bitfit": bitfit,
    "prefix": prefix,
    "prompt": prompt,
}


def selected_methods(peft_cfg) -> dict:
    """peft.method ('lora' or 'lora+prompt') -> {name: module}, in order."""
    return {n: METHODS[n] for n in compose.method_names(peft_cfg.method, METHODS)}


def check_config(peft_cfg, overrides=()) -> None:
    """Raises on unknown methods, missing or unknown options, and on `overrides`
    (dotted keys the user set) that are options of methods not selected."""
    compose.check_options(peft_cfg, selected_methods(peft_cfg), overrides)


def resolve_init_texts(peft_cfg, tokenizer) -> None:
    """For each selected method with an `init_text` option (prompt, prefix), sets its
    `init_token_ids` to the text's tokens (no special tokens, as PEFT's TEXT init), so
    the run's saved config holds both."""
    for name, method in selected_methods(peft_cfg).items():
        if "init_text" not in method.OPTIONS:  # e.g. 'full', which has no options block
            continue
        c = peft_cfg[name]
        if not c.get("init_text"):  # configs saved before the option existed lack it
            continue
        ids = tuple(int(i) for i in tokenizer(c.init_text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise FtlibError(f"peft.{name}.init_text {c.init_text!r} has no tokens")
        if c.init_token_ids and tuple(c.init_token_ids) != ids:
            raise FtlibError(
                f"peft.{name}.init_text and peft.{name}.init_token_ids disagree: set only one"
            )
        c.init_token_ids = ids


def apply_method(model: nnx.Module, peft_cfg, seed: int = 0) -> masks.Mask:
    """Runs each selected method's surgery on `model`, in order, and returns the
    trainable mask. User rules come first: `peft.freeze` regexes freeze,
    `peft.trainable` unfreeze; then a param trains if any method's rules say so."""
    methods = selected_methods(peft_cfg)
    check_config(peft_cfg)
    rngs = nnx.Rngs(seed)
    for method in methods.values():
        method.apply(model, peft_cfg, rngs)
    tables = [
        m.TRAINABLE_RULES(peft_cfg) if callable(m.TRAINABLE_RULES) else m.TRAINABLE_RULES
        for m in methods.values()
    ]
    rules = (
        [(r, False) for r in peft_cfg.freeze]
        + [(r, True) for r in peft_cfg.trainable]
        + compose.method_rules(model, tables)
    )
    return masks.build_mask(model, rules)
