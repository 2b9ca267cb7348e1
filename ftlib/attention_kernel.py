"""The blocked causal attention in C++ on MKL's products (CPU): attention_kernel.cc.

As XLA ops (models/attention.py: `_causal`), the blocked attention transposes q, k, v
and its output between [B, T, heads, H] and [B, heads, T, H], copies every query block
and key prefix out for its products, and concatenates and scatters the blocks' results,
forward and backward. The kernel addresses those blocks in place in the projections'
layout, with the softmax and its gradient in the same call (benchmarks/README.md has
the paired step times). It runs where ftlib's CPU kernels do (ftlib.ffi_kernels: fp32,
one CPU device, the `FTLIB_CPU_GEMM` switch), MKL loaded as for ftlib.mkl_gemm;
elsewhere attention keeps XLA's ops.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftlib import ffi_kernels, mkl_gemm

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
KERNEL = ffi_kernels.Kernel(
    SOURCE,
    {
        "ftlib_causal_attention_fwd": "FtlibCausalAttentionFwd",
        "ftlib_causal_attention_bwd": "FtlibCausalAttentionBwd",
    },
    "the causal attention stays in XLA's ops",
    mkl_gemm.init_mkl,
)


def applies(q_BTNH, k_BTKH, v_BTKH) -> bool:
    """Whether `forward` and `backward` run here: float32 q [B, T, N, H] and k, v
    [B, T, K, H] with K dividing N, one CPU device, the kernel built."""
    if jnp.ndim(q_BTNH) != 4 or jnp.shape(k_BTKH) != jnp.shape(v_BTKH) or jnp.ndim(k_BTKH) != 4:
        return False
    (B, T, N, H), K = q_BTNH.shape, k_BTKH.shape[2]
    if k_BTKH.shape[:2] != (B, T) or k_BTKH.shape[3] != H or N % K:
        return False
    return KERNEL.applies(q_BTNH, k_BTKH, v_BTKH)


def forward(blocks: int, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    """-> (out [B, T, N, H], probs [B, N, P]): causal softmax attention over `blocks`
    query blocks (each meets keys up to its own end; mask_BTT must hide every key after
    its query), scores scaled by 1 / sqrt(H); probs are the blocks' probabilities, for
    `backward`. Not differentiable: models/attention.py gives it a VJP."""
    B, T, N, _ = q_BTNH.shape
    R = T // blocks
    results = (
        jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32),
        jax.ShapeDtypeStruct((B, N, R * R * blocks * (blocks + 1) // 2), jnp.float32),
    )
    return KERNEL.call(
        "ftlib_causal_attention_fwd",
        results,
        q_BTNH,
        k_BTKH,
        v_BTKH,
        jnp.broadcast_to(mask_BTT, (B, T, T)).astype(jnp.bool_),  # e.g. a [1, T, T] mask
        blocks=np.int64(blocks),
    )


def backward(blocks: int, q_BTNH, k_BTKH, v_BTKH, probs, dout_BTNH):
    """-> (dq, dk, dv) of `forward`'s output for the cotangent dout (the output itself is
    not needed)."""
    results = (
        jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32),
        jax.ShapeDtypeStruct(k_BTKH.shape, jnp.float32),
        jax.ShapeDtypeStruct(v_BTKH.shape, jnp.float32),
    )
    return KERNEL.call(
        "ftlib_causal_attention_bwd",
        results,
        q_BTNH,
        k_BTKH,
        v_BTKH,
        probs,
        dout_BTNH.astype(jnp.float32),
        blocks=np.int64(blocks),
    )
