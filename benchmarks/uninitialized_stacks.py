"""An experiment for paired_ab.py (variant `uninitialized_scan_stacks`): lax.scan's
stacked outputs allocated without the zero fill.

JAX builds a scan's stacked outputs (the forward's saved residuals, the backward's
per-layer weight gradients) as broadcast zeros that the loop then overwrites slice by
slice; on the CPU XLA writes those zeros (llama-small full: ~0.1 s of a ~3.9 s step in
`wrapped_broadcast` fills). On GPUs and TPUs `lax.empty` lowers to XLA's
AllocateBuffer instead; the CPU has no such target, so this patches JAX's private
`_empty_array` to a custom call that returns its buffer unwritten (float32, one CPU
device). Not the library's path: it reaches into jax._src.
"""

import contextlib
import pathlib

import jax

from ftlib import ffi_kernels

KERNEL = ffi_kernels.Kernel(
    pathlib.Path(__file__).with_suffix(".cc"),
    {"ftlib_uninitialized": "FtlibUninitialized"},
    "scan stacks stay zero-filled",
)


@contextlib.contextmanager
def patched():
    from jax._src.lax.control_flow import loops

    original = loops._empty_array

    def empty_array(prefix, length_spec, aval):
        out = jax.ShapeDtypeStruct((*prefix, *aval.shape), aval.dtype)
        if not KERNEL.applies(out):
            return original(prefix, length_spec, aval)
        # Side-effecting, so that XLA neither merges two stacks of one shape into one
        # buffer nor moves the call.
        return jax.ffi.ffi_call("ftlib_uninitialized", out, has_side_effect=True)()

    loops._empty_array = empty_array
    try:
        yield
    finally:
        loops._empty_array = original
