"""The CLIs' restart with their malloc settings (glibc's huge-page tunable, the block
cache): when it happens, what it sets; and the block cache itself, preloaded into a
child process."""

import os
import platform
import subprocess
import sys

import pytest

from ftlib import malloc_env

NO_LIBRARY = lambda: None  # noqa: E731


def test_hugepage_env_only_where_it_changes_something():
    env = malloc_env.hugepage_env({"A": "1"}, "glibc", "madvise")
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = malloc_env.hugepage_env(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "glibc", "madvise"
    )
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"
    # The user's own setting (0 opts out), or an earlier restart's: no loop.
    assert (
        malloc_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", "madvise")
        is None
    )
    assert malloc_env.hugepage_env({}, "", "madvise") is None  # musl, macOS
    assert malloc_env.hugepage_env({}, "glibc", "always") is None  # huge pages without asking
    assert malloc_env.hugepage_env({}, "glibc", "never") is None


def test_block_cache_env_only_where_it_changes_something():
    lib = lambda: "/c/block_cache.so"  # noqa: E731
    assert malloc_env.block_cache_env({"A": "1"}, "glibc", lib) == {
        "A": "1",
        "LD_PRELOAD": "/c/block_cache.so",
    }
    assert malloc_env.block_cache_env({}, "glibc", NO_LIBRARY) is None  # no compiler
    assert malloc_env.block_cache_env({}, "", lib) is None  # not glibc
    assert malloc_env.block_cache_env({"FTLIB_BLOCK_CACHE": "0"}, "glibc", lib) is None
    # The user's own preload (e.g. another allocator), or an earlier restart's: kept.
    assert malloc_env.block_cache_env({"LD_PRELOAD": "libx.so"}, "glibc", lib) is None


def test_restart_env_combines_both_settings():
    lib = lambda: "/c/block_cache.so"  # noqa: E731
    both = malloc_env.restart_env({}, "glibc", "madvise", lib)
    assert both == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "LD_PRELOAD": "/c/block_cache.so"}
    assert malloc_env.restart_env({}, "glibc", "always", lib) == {"LD_PRELOAD": "/c/block_cache.so"}
    assert malloc_env.restart_env({}, "glibc", "madvise", NO_LIBRARY) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"
    }
    assert malloc_env.restart_env(both, "glibc", "madvise", lib) is None  # after the restart


def test_block_cache_library_is_none_where_it_cannot_be_built(tmp_path, monkeypatch):
    """No compiler, or a cache that cannot be written: the CLI starts without the cache
    instead of failing."""
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert malloc_env.block_cache_library() is None
    monkeypatch.delenv("CXX")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FTLIB_CACHE", str(blocker / "cache"))
    assert malloc_env.block_cache_library() is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert malloc_env._thp_mode(str(f)) == "madvise"
    assert malloc_env._thp_mode(str(tmp_path / "missing")) == ""


def test_restart_keeps_arguments_and_sets_the_environment(monkeypatch):
    """A real exec: the child restarts itself once, with its -c program and argument."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    code = (
        "import os, sys; from ftlib import malloc_env; "
        "malloc_env.restart_env = lambda env, libc, mode, lib: None if 'GLIBC_TUNABLES' in env "
        "else dict(env, GLIBC_TUNABLES='glibc.malloc.hugetlb=1'); "
        "malloc_env.restart(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "x"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.stdout.strip() == "glibc.malloc.hugetlb=1 ['x']", out.stderr


def test_no_restart_of_a_program_read_from_stdin(monkeypatch):
    """`python - < prog.py` would find stdin empty after an exec: it is left alone."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    code = (
        "import os; from ftlib import malloc_env; "
        "malloc_env.restart_env = lambda env, libc, mode, lib: dict(env, GLIBC_TUNABLES='x'); "
        "malloc_env.restart(); print(os.environ.get('GLIBC_TUNABLES'))\n"
    )
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr


# Run with the block cache preloaded: big blocks through malloc, posix_memalign and
# realloc, read back through ctypes. MB = 2**20.
CACHE_PROGRAM = r"""
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.free.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
MB = 2**20

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def memalign(size, alignment=64):
    p = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(p), alignment, size) == 0
    return p.value

a = memalign(100 * MB)
assert a % (2 * MB) == 0 and libc.malloc_usable_size(a) == 100 * MB
ctypes.memset(a, 7, 100 * MB)
libc.free(a)
assert memalign(99 * MB) == a  # reused: within a quarter above the request
assert ctypes.string_at(a + 50 * MB, 1) == b"\x07"  # kept mapped, not zeroed
b = libc.malloc(100 * MB)  # a is in use: a new block
assert b not in (None, a)
ctypes.memset(b, 1, 100 * MB)
before = rss()
libc.free(a)  # b, handed out after a, is in use: a is not kept beside it
assert rss() < before - 90 * MB
libc.free(b)  # kept: no block handed out after it is in use
before = rss()
c = libc.malloc(40 * MB)  # too small for b's 100 MB: a new block, b unmapped first
assert c is not None and rss() < before - 90 * MB
c2 = libc.realloc(c, 20 * MB)  # shrinking keeps the block
assert c2 == c
ctypes.memset(c, 3, 40 * MB)
d = libc.realloc(c, 60 * MB)  # growing moves it, contents kept
assert ctypes.string_at(d + 40 * MB - 1, 1) == b"\x03"
small = libc.malloc(1000)  # glibc's, as is everything under 32 MB
assert libc.malloc_usable_size(small) >= 1000
libc.free(small)
e = libc.malloc(100 * MB)
ctypes.memset(e, 1, 100 * MB)
libc.free(e)  # kept: d, in use, was handed out before it
before = rss()
libc.free(d)  # one unused block at most: e unmapped
assert rss() < before - 90 * MB
print("ok")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the block cache needs glibc")
def test_block_cache_reuses_big_blocks_and_leaves_the_rest_to_glibc(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path))
    library = malloc_env.block_cache_library()
    if library is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ, LD_PRELOAD=str(library))
    out = subprocess.run(
        [sys.executable, "-c", CACHE_PROGRAM], capture_output=True, text=True, env=env
    )
    assert out.stdout.strip() == "ok", out.stderr
