"""SwiGLU's backward in one C++ pass over gate, up and dh (CPU): swiglu_backward.cc.

XLA:CPU runs layers.swiglu's backward as three or four passes over [tokens,
intermediate] with the sigmoid materialized between them; the kernel reads each input
once and writes each gradient once. It runs where ftlib's CPU kernels do
(ftlib.ffi_kernels: fp32, one CPU device, the `FTLIB_CPU_GEMM` switch).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(
    SOURCE,
    {
        "ftlib_swiglu_backward": "FtlibSwigluBackward",
        "ftlib_swiglu_backward_h": "FtlibSwigluBackwardH",
    },
    "SwiGLU's backward stays in XLA",
)


def applies(gate, up, dh) -> bool:
    """Same-shaped float32 operands, one CPU device, the kernel built."""
    same = jnp.shape(gate) == jnp.shape(up) == jnp.shape(dh)
    return same and KERNEL.applies(gate, up, dh)


def backward(gate, up, dh, *, with_h: bool = False):
    """-> (dgate, dup) of h = silu(gate) * up for the cotangent dh (float32, same shapes);
    with_h: (dgate, dup, h), h recomputed in the same pass."""
    out = jax.ShapeDtypeStruct(gate.shape, gate.dtype)
    if with_h:
        return KERNEL.call("ftlib_swiglu_backward_h", (out, out, out), gate, up, dh)
    return KERNEL.call("ftlib_swiglu_backward", (out, out), gate, up, dh)
