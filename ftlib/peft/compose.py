"""Method lists ('lora+prompt'), their config check, and their combined rules.

Methods joined by '+' run their surgery in order; a param trains if any of
their rule tables makes it trainable. Each method's options live in
`config.peft.<method>` and are named by the module's `OPTIONS`.
"""

from __future__ import annotations

import re

from flax import nnx

from ftlib import masks
from ftlib.errors import FtlibError


def method_names(method: str, known) -> list[str]:
    names = [n.strip() for n in method.split("+")]
    for name in names:
        if name not in known:
            raise FtlibError(
                f"unknown peft.method {name!r}; known: {', '.join(sorted(known))} "
                "(join several with '+', e.g. 'lora+prompt')"
            )
    if len(set(names)) != len(names):
        raise FtlibError(f"peft.method {method!r} names a method twice")
    return names


def check_options(peft_cfg, methods: dict, overrides=()) -> None:
    """Each selected method's block `peft.<name>` holds exactly its OPTIONS, and
    no key in `overrides` (dotted config keys the user set, e.g. from the command
    line or a sweep) is an option of a method that is not selected: it would
    silently do nothing."""
    for name, method in methods.items():
        if not method.OPTIONS:
            continue
        if name not in peft_cfg:
            raise FtlibError(
                f"peft.method includes {name!r} but config.peft has no {name!r} block "
                f"(options {', '.join(method.OPTIONS)}; see configs/default.py)"
            )
        have, want = set(peft_cfg[name]), set(method.OPTIONS)
        if have != want:
            odd = sorted(have - want) or sorted(want - have)
            raise FtlibError(
                f"peft.{name} {'has unknown' if have - want else 'lacks'} options {odd}; "
                f"its options are {', '.join(method.OPTIONS)}"
            )
    for key in overrides:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "peft" and parts[1] not in methods:
            raise FtlibError(
                f"{key} has no effect: peft.method {peft_cfg.method!r} does not include "
                f"{parts[1]!r} (add it, e.g. '{peft_cfg.method}+{parts[1]}', or drop the option)"
            )


def method_rules(model: nnx.Module, rule_tables: list) -> list:
    """One ordered rule table equivalent to 'trainable if any table says so'.
    A single table is returned as is; several are resolved per param path (each
    table first-match, results OR-ed) into exact-path rules."""
    if len(rule_tables) == 1:
        return list(rule_tables[0])
    compiled = [[(re.compile(r), t) for r, t in table] for table in rule_tables]
    rules = []
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = masks.path_str(path)
        trainable = False
        for table in compiled:
            match = next((t for regex, t in table if regex.fullmatch(name)), None)
            if match is None:
                raise FtlibError(f"no trainable/freeze rule covers param {name}")
            trainable = trainable or match
        rules.append((re.escape(name), trainable))
    return rules
