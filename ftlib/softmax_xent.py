"""The fused LM head's per-block softmax cross-entropy as one C++ pass per row (CPU).

XLA:CPU runs a block's max, exp, sum, first-maximum key, its min and the logit
gradient as six passes over the [rows, V] slab; softmax_xent.cc reads each row once
and writes it once, the rest in cache (benchmarks/README.md has the timings). It
runs where ftlib's CPU kernels do (ftlib.ffi_kernels: fp32, one CPU device, the
`FTLIB_CPU_GEMM` switch); elsewhere linear_cross_entropy keeps XLA's ops.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(
    SOURCE, {"ftlib_softmax_xent": "FtlibSoftmaxXent"}, "the LM head's softmax stays in XLA"
)


def applies(logits_NV) -> bool:
    """Whether `rows` runs here: float32 [N, V] logits, one CPU device, the kernel built."""
    return jnp.ndim(logits_NV) == 2 and KERNEL.applies(logits_NV)


def rows(logits_NV, targets_N, weights_N, *, gradient: bool):
    """-> (g_NV, nll_N, correct_N) per row, weighted by weights_N:
    g = w * (softmax(logits) - onehot(target)) (the logits themselves when `gradient`
    is False: nothing is written), nll = w * (logsumexp - logits[target]) and
    correct = w * [argmax == target], ties going to the first maximum as argmax's do.
    g reuses the logits' buffer. Not differentiable: linear_cross_entropy's VJP uses g."""
    N, _ = logits_NV.shape
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return KERNEL.call(
        "ftlib_softmax_xent",
        (f32(logits_NV.shape), f32((N,)), f32((N,))),
        logits_NV,
        targets_N.astype(jnp.int32),
        weights_N.astype(jnp.float32),
        gradient=bool(gradient),
        input_output_aliases={0: 0},
    )
