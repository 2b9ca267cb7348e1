"""The blocked attention's per-block softmax as one C++ pass per row (CPU): masked_softmax.cc.

XLA:CPU runs the mask's add, the max, exp, sum and scaling as one YNNPACK fusion at
about 1.5 ns a score; the kernel does each row (128-512 scores, in L1) in one pass
(benchmarks/README.md has the timings). It runs where ftlib's CPU kernels do
(ftlib.ffi_kernels: fp32, one CPU device, the `FTLIB_CPU_GEMM` switch); elsewhere
attention keeps XLA's ops.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(
    SOURCE, {"ftlib_masked_softmax": "FtlibMaskedSoftmax"}, "the attention's softmax stays in XLA"
)


def applies(s_BKRS) -> bool:
    """Whether `probs` runs here: float32 [B, K, R, S] scores, one CPU device, the
    kernel built."""
    return jnp.ndim(s_BKRS) == 4 and KERNEL.applies(s_BKRS)


def probs(s_BKRS, bias_BRS):
    """-> softmax over S of s + bias, bias shared by the K heads; p reuses s's buffer.
    Not differentiable: the attention's VJP uses p."""
    return KERNEL.call(
        "ftlib_masked_softmax",
        jax.ShapeDtypeStruct(s_BKRS.shape, jnp.float32),
        s_BKRS,
        bias_BRS.astype(jnp.float32),
        input_output_aliases={0: 0},
    )
