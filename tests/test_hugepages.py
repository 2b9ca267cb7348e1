"""The CLIs' restart with glibc's huge-page tunable: when it happens, what it sets."""

import os
import subprocess
import sys

from ftlib import hugepages


def test_restart_env_only_where_it_changes_something():
    env = hugepages.hugepage_env({"A": "1"}, "glibc", "madvise")
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = hugepages.hugepage_env(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "glibc", "madvise"
    )
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"
    # The user's own setting (0 opts out), or an earlier restart's: no loop.
    assert (
        hugepages.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", "madvise")
        is None
    )
    assert hugepages.hugepage_env({}, "", "madvise") is None  # musl, macOS
    assert hugepages.hugepage_env({}, "glibc", "always") is None  # huge pages without asking
    assert hugepages.hugepage_env({}, "glibc", "never") is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages._thp_mode(str(f)) == "madvise"
    assert hugepages._thp_mode(str(tmp_path / "missing")) == ""


def test_restart_keeps_arguments_and_sets_the_tunable(monkeypatch):
    """A real exec: the child restarts itself once, with its -c program and argument."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    code = (
        "import os, sys; from ftlib import hugepages; "
        "hugepages.hugepage_env = lambda env, libc, mode: None if 'GLIBC_TUNABLES' in env "
        "else dict(env, GLIBC_TUNABLES='glibc.malloc.hugetlb=1'); "
        "hugepages.restart_with_hugepages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "x"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.stdout.strip() == "glibc.malloc.hugetlb=1 ['x']", out.stderr


def test_no_restart_of_a_program_read_from_stdin(monkeypatch):
    """`python - < prog.py` would find stdin empty after an exec: it is left alone."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    code = (
        "import os; from ftlib import hugepages; "
        "hugepages.hugepage_env = lambda env, libc, mode: dict(env, GLIBC_TUNABLES='x'); "
        "hugepages.restart_with_hugepages(); print(os.environ.get('GLIBC_TUNABLES'))\n"
    )
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr
