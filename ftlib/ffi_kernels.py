"""ftlib's C++ kernels for XLA:CPU (FFI custom calls): the switch, the build, the cache.

Each kernel is one .cc file next to this module (mkl_gemm.cc, softmax_xent.cc,
swiglu_backward.cc, rms_norm_kernel.cc, adamw_kernel.cc, masked_softmax.cc,
attention_kernel.cc), sharing cpu_pool.h, cpu_math.h and mkl_sgemm.h. It is compiled on
first use with the C++ compiler (`$CXX`, else g++) against jaxlib's FFI headers and cached
in `$FTLIB_CACHE/kernels` (default ~/.cache/ftlib) by a hash of its sources, the build
flags and jax's version.

`FTLIB_CPU_GEMM` picks for all of them: `auto` (default: ftlib's kernels where they
build), `xla` (XLA's own ops everywhere), `mkl` (ftlib's kernels always on CPU for
fp32, and an error when one cannot be built).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib

import jax
import jax.numpy as jnp

from ftlib import cxx_build
from ftlib.cxx_build import Unavailable
from ftlib.errors import FtlibError

HERE = pathlib.Path(__file__).parent
HEADERS = (HERE / "cpu_pool.h", HERE / "cpu_math.h", HERE / "mkl_sgemm.h")
CHOICES = ("auto", "xla", "mkl")
# No errno from sqrt and no trapping FP exceptions: neither is ever read, and without
# them GCC leaves loops with a square root or a select over a division scalar.
FLAGS = ("-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math")


def choice() -> str:
    value = os.environ.get("FTLIB_CPU_GEMM", "auto")
    if value not in CHOICES:
        raise FtlibError(f"FTLIB_CPU_GEMM={value!r}: expected one of {CHOICES}")
    return value


def single_cpu_device() -> bool:
    """Custom calls have no sharding rule: ftlib's kernels run on a one-device CPU
    backend only, and sharded or accelerator steps keep XLA's ops."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def build(source: pathlib.Path) -> pathlib.Path:
    """Compiles `source` once per source, header, flag and jax version -> the cached .so."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in HEADERS) + str(FLAGS).encode()
    flags = [*FLAGS, "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{HERE}"]
    return cxx_build.compiled(source, text + jax.__version__.encode(), flags)


def load(source: pathlib.Path, targets: dict[str, str], init=None) -> ctypes.CDLL:
    """Builds and loads `source`, runs `init(library)` (which may raise Unavailable),
    then registers each FFI target name -> exported handler symbol on the CPU."""
    library = ctypes.cdll.LoadLibrary(str(build(source)))
    if init is not None:
        init(library)
    for target, symbol in targets.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return library


class Kernel:
    """One kernel source: built, loaded and registered once, on first use."""

    def __init__(self, source: pathlib.Path, targets: dict[str, str], fallback: str, init=None):
        self.source, self.targets, self.fallback, self.init = source, targets, fallback, init
        self._tried, self._reason = False, None

    def load(self) -> str | None:
        """-> None when the targets are registered, else why not (warned once as
        "ftlib: {fallback}: why"). Tried once per process."""
        if not self._tried:
            try:
                load(self.source, self.targets, self.init)
            except (Unavailable, OSError) as e:  # OSError: an unwritable cache, a bad .so
                logging.warning("ftlib: %s: %s", self.fallback, e)
                self._reason = str(e)
            self._tried = True
        return self._reason

    def applies(self, *operands) -> bool:
        """Whether the kernel runs on these operands: all float32, one CPU device,
        FTLIB_CPU_GEMM not `xla`, the kernel built (under `mkl`, or an error)."""
        mode = choice()
        if mode == "xla" or not single_cpu_device():
            return False
        if any(jnp.result_type(x) != jnp.float32 for x in operands):
            return False
        reason = self.load()
        if reason is not None and mode == "mkl":
            raise Unavailable(f"FTLIB_CPU_GEMM=mkl: {reason}")
        return reason is None

    def call(self, target: str, results, *operands, input_output_aliases=None, **attrs):
        """jax.ffi.ffi_call of one of the targets (registered first if need be)."""
        reason = self.load()
        if reason is not None:
            raise Unavailable(reason)
        fn = jax.ffi.ffi_call(
            target, results, vmap_method="sequential", input_output_aliases=input_output_aliases
        )
        return fn(*operands, **attrs)
