"""Model surgery: replace submodules whose path matches a regex."""

from __future__ import annotations

import re
from typing import Callable

from flax import nnx

from ftlib.errors import FtlibError


def module_path(path) -> str:
    return "/".join(str(p) for p in path)


def replace_modules(model: nnx.Module, pattern: str, kind: type, make: Callable) -> list[str]:
    """Replaces every `kind` submodule whose path fully matches `pattern` by
    `make(old)`. A pattern that matches nothing is a user error, not a no-op."""
    regex = re.compile(pattern)
    # A Linear another method already wrapped would be skipped silently: refuse.
    wrapped = [
        (module_path(p), m)
        for p, m in nnx.iter_modules(model)
        if p and isinstance(getattr(m, "base", None), kind) and regex.fullmatch(module_path(p))
    ]
    if wrapped:
        path, m = wrapped[0]
        raise FtlibError(
            f"{path} is already adapted ({type(m).__name__}): two methods cannot wrap one "
            f"{kind.__name__}; narrow one method's target regex ({pattern!r} matches it)"
        )
    found = [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if path and isinstance(m, kind) and regex.fullmatch(module_path(path))
    ]
    if not found:
        candidates = sorted(
            {module_path(p) for p, m in nnx.iter_modules(model) if p and isinstance(m, kind)}
        )
        raise FtlibError(
            f"target regex {pattern!r} matches no {kind.__name__} module; "
            f"modules are: {', '.join(candidates)}"
        )
    for path, old in found:
        set_module(model, path, make(old))
    return [module_path(p) for p, _ in found]


def set_module(model: nnx.Module, path, module: nnx.Module) -> None:
    """Puts `module` at `path` (a tuple of attribute names) inside `model`."""
    parent = model
    for part in path[:-1]:
        parent = getattr(parent, part)
    setattr(parent, path[-1], module)
