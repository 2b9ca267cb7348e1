"""ftlib's C++ sources compiled once into cached shared libraries, for the FFI kernels
(ftlib.ffi_kernels) and the block cache (ftlib.malloc_env). No jax import: the CLIs'
restart builds the block cache before jax loads."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from ftlib import assets
from ftlib.errors import FtlibError


class Unavailable(FtlibError):
    """An ftlib CPU kernel cannot be used here (no compiler, a failed build, no MKL)."""


def compiled(source: pathlib.Path, key: bytes, flags, libs=("-ldl",)) -> pathlib.Path:
    """`source` compiled with the C++ compiler (`$CXX`, else g++) and `flags` once per
    `key` (everything the build depends on) -> the .so in `$FTLIB_CACHE/kernels`.
    Raises Unavailable (no compiler, a failed build) or OSError (an unwritable cache)."""
    cache = assets.cache_dir() / "kernels"
    library = cache / f"{source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise Unavailable(f"no C++ compiler ($CXX or g++) to build ftlib/{source.name}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then an atomic rename
        built = pathlib.Path(tmp) / library.name
        cmd = [compiler, *flags, str(source), "-o", str(built), *libs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"building {source.name} failed:\n{done.stderr[-2000:]}")
        os.replace(built, library)
    return library
