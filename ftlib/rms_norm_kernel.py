"""RMSNorm's forward and backward, each one C++ pass over the rows (CPU): rms_norm_kernel.cc.

XLA:CPU runs layers.rms_norm as a reduction, an rsqrt and a scaling pass forward and
four or five passes backward; the kernels read and write each [tokens, hidden] array
once. They run where ftlib's CPU kernels do (ftlib.ffi_kernels: fp32, one CPU device,
the `FTLIB_CPU_GEMM` switch); elsewhere layers.rms_norm keeps XLA's ops.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(
    SOURCE,
    {"ftlib_rms_norm_fwd": "FtlibRmsNormFwd", "ftlib_rms_norm_bwd": "FtlibRmsNormBwd"},
    "RMSNorm stays in XLA",
)


def applies(x_TD, scale_D, *more) -> bool:
    """float32 x [..., D] with a [D] scale (and same-shaped cotangents), one CPU device."""
    shapes_ok = jnp.ndim(scale_D) == 1 and jnp.shape(x_TD)[-1:] == jnp.shape(scale_D)
    return shapes_ok and KERNEL.applies(x_TD, scale_D, *more)


def forward(x_TD, scale_D, eps: float):
    """-> (x / rms(x) * scale, 1 / rms(x) with a trailing 1 dim), as layers.rms_norm."""
    r_shape = (*x_TD.shape[:-1], 1)
    out = (
        jax.ShapeDtypeStruct(x_TD.shape, jnp.float32),
        jax.ShapeDtypeStruct(r_shape, jnp.float32),
    )
    return KERNEL.call("ftlib_rms_norm_fwd", out, x_TD, scale_D, eps=np.float32(eps))


def backward(x_TD, r_T1, scale_D, dy_TD):
    """-> (dx, dscale) of forward's y for the cotangent dy."""
    out = (
        jax.ShapeDtypeStruct(x_TD.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale_D.shape, jnp.float32),
    )
    return KERNEL.call("ftlib_rms_norm_bwd", out, x_TD, r_T1, scale_D, dy_TD)
