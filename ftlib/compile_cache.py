"""JAX's persistent compilation cache for training runs (`config.compilation_cache`).

Why: a process that compiles the same train and eval steps again (a run resumed
after a kill, the next run of a sweep, a notebook restarted, a re-run with another
workdir) loads the executables instead of compiling them. On this project's 2-core
CPU the llama-tiny LoRA step goes from 4.6 s to 0.8 s.

XLA:CPU compiles for the host's instruction set, and JAX's cache key does not name
it, so the folder does: a cache in a home shared between machines never hands one
CPU's code to another. The cache is trusted code (JAX's warning): keep it private.
"""

from __future__ import annotations

import hashlib
import pathlib
import platform

import jax
from jax.experimental.compilation_cache import compilation_cache

from ftlib.assets import cache_dir

MAX_BYTES = 2 * 2**30  # least recently used executables go beyond this
_ours: str | None = None  # the folder the last enable() set, to tell it from the user's


def host_key() -> str:
    """A short hash of this machine's architecture, CPU model and CPU flags."""
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    lines = sorted(
        {line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))}
    )
    return hashlib.sha256("\n".join([platform.machine(), *lines]).encode()).hexdigest()[:16]


def enable(setting: str) -> pathlib.Path | None:
    """setting: 'auto' (JAX's own cache dir if the user set one, else
    <ftlib cache dir>/xla/<host key>), a folder, or '' (off). -> the folder or None."""
    global _ours
    if setting == "auto":
        users = jax.config.jax_compilation_cache_dir
        users = None if users == _ours else users
        path = pathlib.Path(users) if users else cache_dir() / "xla" / host_key()
    else:
        path = pathlib.Path(setting).expanduser() if setting else None
    # JAX decides once per process whether the cache is on, at the first compile;
    # resetting makes this setting count whatever ran before.
    compilation_cache.reset_cache()
    _ours = str(path) if path else None
    compilation_cache.set_cache_dir(_ours)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
