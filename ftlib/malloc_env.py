"""How ftlib's CLIs set up malloc, by restarting themselves once (exec: same PID, same
arguments) with two settings that a process can only take when it starts:

- Transparent huge pages for malloc: glibc's `glibc.malloc.hugetlb=1` tunable, where
  the kernel gives huge pages on request. XLA's CPU runtime allocates every step's
  large temporaries fresh; glibc serves each with a new mmap, and the kernel then
  zero-fills it one 4 KiB page fault at a time (llama-tiny LoRA: ~92,000 faults, ~360
  MB per step). With the tunable malloc asks for 2 MiB pages (madvise MADV_HUGEPAGE),
  512x fewer faults, for the same peak RSS; the first step pays ~1.5 s once for the
  kernel's first huge pages. A user's own `glibc.malloc.hugetlb` in GLIBC_TUNABLES
  wins: `glibc.malloc.hugetlb=0` turns this off.
- The block cache (ftlib/block_cache.cc, LD_PRELOAD): freed blocks of 32 MB and more
  stay mapped for the next allocation of about their size, so a step's temporaries
  (one block: 717 MB for llama-small LoRA) are not zero-filled by the kernel again
  every step. Built on first use with the C++ compiler and cached in
  `$FTLIB_CACHE/kernels`; off with `FTLIB_BLOCK_CACHE=0`, and never added to an
  LD_PRELOAD the user set (another allocator there must see every free).

Both need glibc (Linux). Notebooks and other embedders set the variables before
starting Python. Measured in benchmarks/README.md.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

from ftlib import cxx_build

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
BLOCK_CACHE_SOURCE = pathlib.Path(__file__).parent / "block_cache.cc"
BLOCK_CACHE_SWITCH = "FTLIB_BLOCK_CACHE"


def _thp_mode(path: str = THP_ENABLED) -> str:
    """The kernel's THP mode: 'always', 'madvise' or 'never' ('' when unknown)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def hugepage_env(environ, libc: str, thp_mode: str) -> dict | None:
    """The environment to restart with, or None if nothing would change: not glibc,
    huge pages not given on request (mode 'always' gives them without asking; 'never'
    not at all), or the tunable already set (by the user, or by an earlier restart)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if libc != "glibc" or thp_mode != "madvise" or TUNABLE in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
    return env


def block_cache_library() -> pathlib.Path | None:
    """block_cache.cc built once per source into the cache -> the .so, or None where it
    cannot be built (no compiler, a failed build, an unwritable cache: ftlib then runs
    without it)."""
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC"]
    source = BLOCK_CACHE_SOURCE
    try:
        return cxx_build.compiled(source, source.read_bytes(), flags, libs=("-ldl", "-pthread"))
    except (cxx_build.Unavailable, OSError):
        return None


def block_cache_env(environ, libc: str, library) -> dict | None:
    """The environment with the block cache preloaded, or None if nothing would change:
    not glibc (it calls glibc's own allocator), switched off, LD_PRELOAD already set (by
    the user, or by an earlier restart), or no library (`library()` -> path or None,
    called only when needed)."""
    if libc != "glibc" or environ.get(BLOCK_CACHE_SWITCH, "1") == "0" or "LD_PRELOAD" in environ:
        return None
    path = library()
    return None if path is None else dict(environ, LD_PRELOAD=str(path))


def restart_env(environ, libc: str, thp_mode: str, library) -> dict | None:
    """Both settings' environment, or None if neither changes anything."""
    env = hugepage_env(environ, libc, thp_mode)
    env = block_cache_env(env or environ, libc, library) or env
    return env


def restart() -> None:
    """Re-exec this process with the settings above, when `restart_env` says so; else
    return. Call it first thing in a CLI, before anything is worth losing. An
    interactive session or a program read from stdin ('' or '-') cannot be rerun."""
    if sys.argv[0] in ("", "-"):
        return
    env = restart_env(os.environ, platform.libc_ver()[0], _thp_mode(), block_cache_library)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
