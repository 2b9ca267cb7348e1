"""RoPE applied in one C++ pass (CPU): rope_kernel.cc.

XLA:CPU fuses the tables' cos and sin into each consumer of layers.apply_rope, so in the
layer loop every layer's q and k, forward and backward, recompute both per head (the
tables' [B, T, H] elements once per head). As custom-call operands the tables are
computed once. It runs where ftlib's CPU kernels do (ftlib.ffi_kernels: fp32, one CPU
device, the `FTLIB_CPU_GEMM` switch).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(SOURCE, {"ftlib_rope": "FtlibRope"}, "RoPE stays in XLA")


def applies(x_BTNH, cos_BTH, sin_BTH) -> bool:
    """float32 x [B, T, N, H] (H even) with [B, T, H] tables, one CPU device."""
    B, T, _, H = jnp.shape(x_BTNH)
    tables_ok = jnp.shape(cos_BTH) == jnp.shape(sin_BTH) == (B, T, H) and H % 2 == 0
    return tables_ok and KERNEL.applies(x_BTNH, cos_BTH, sin_BTH)


def rotate(x_BTNH, cos_BTH, sin_BTH, *, inverse: bool):
    """x rotated by the tables' angles (inverse: by minus them, the transpose)."""
    B, T, N, H = x_BTNH.shape
    out = jax.ShapeDtypeStruct((B * T, N, H), jnp.float32)
    y = KERNEL.call(
        "ftlib_rope",
        out,
        x_BTNH.reshape(B * T, N, H),
        cos_BTH.reshape(B * T, H),
        sin_BTH.reshape(B * T, H),
        inverse=np.int32(inverse),
    )
    return y.reshape(B, T, N, H)
