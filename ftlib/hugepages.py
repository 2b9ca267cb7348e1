"""Transparent huge pages for malloc: the CLIs restart themselves with glibc's
`glibc.malloc.hugetlb=1` tunable when the kernel gives huge pages on request.

XLA's CPU runtime allocates every step's large temporaries fresh; glibc serves each
with a new mmap, and the kernel then zero-fills it one 4 KiB page fault at a time
(llama-tiny LoRA: ~92,000 faults, ~360 MB per step). With the tunable, malloc asks
for 2 MiB pages (madvise MADV_HUGEPAGE), 512x fewer faults, for the same peak RSS;
the first step pays ~1.5 s once for the kernel's first huge pages (measured in
benchmarks/README.md). glibc reads tunables only when a process starts, so the
setting needs a restart (exec: same PID, same arguments). A user's own
`glibc.malloc.hugetlb` in GLIBC_TUNABLES wins: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns this off. Notebooks and other embedders set the variable before starting Python.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def restart_with_hugepages() -> None:
    """Re-exec this process with the tunable set, when `hugepage_env` says so; else
    return. Call it first thing in a CLI, before anything is worth losing. An
    interactive session or a program read from stdin ('' or '-') cannot be rerun."""
    if sys.argv[0] in ("", "-"):
        return
    env = hugepage_env(os.environ, platform.libc_ver()[0], _thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
