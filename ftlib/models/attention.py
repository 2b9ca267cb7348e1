"""Softmax attention: a general masked version, and a causal block-skipping one
with a hand-written backward that training uses.

Why the second one exists: on CPU (and at fine-tuning sequence lengths on any
backend) autodiff of the plain version materialises the whole [T, S] score and
probability matrices, half of which the causal mask throws away, and XLA's
layouts for its backward add transposes. `causal_attention` cuts queries into
blocks and gives block i only keys [0, end of block i): the work above the
diagonal is never done, and the backward reuses the saved probabilities.

On a GPU, flash-attention kernels do the same without storing probabilities:
`impl='cudnn'` (cuDNN's fused attention: a causal + sequence-length mask when rows
are unpacked, the segment mask as an additive bias when packed) or `impl='pallas'`
(JAX's Pallas/Triton kernel, which takes segment ids).
`impl='auto'` picks per backend and dtype (`resolve_impl`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ftlib import attention_kernel, masked_softmax
from ftlib.models.layers import accumulation_dtype, einsum

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Softmax attention where N query heads share K key/value heads in groups of
    N // K (GQA; K == N is plain multi-head). mask_BTS: query t may see key s."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    acc = accumulation_dtype(q_BTNH, k_BSKH)  # float32 results for XLA:CPU's bf16 kernels
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=acc)
    scores = scores * (H**-0.5)
    scores = jnp.where(mask_BTS[:, None, None], scores.astype(jnp.float32), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def query_blocks(T: int, target: int = 128) -> int:
    """How many equal query blocks causal_attention cuts T into: blocks of about
    `target` rows (big enough for efficient matmuls), at most 16 of them."""
    n = max(1, min(16, T // target))
    while T % n:
        n -= 1
    return n


# Query rows per block in ftlib.attention_kernel (CPU); XLA's ops take query_blocks' 128.
KERNEL_BLOCK_ROWS = 64
IMPLS = ("auto", "blocked", "cudnn", "pallas")
# What 'auto' runs on a GPU in bf16/fp16 (benchmarks/README.md, GPU section).
GPU_AUTO = "cudnn"


def resolve_impl(impl: str, dtype, T: int, head_dim: int, has_segment_ids: bool) -> str:
    """The kernel that `causal_attention(impl=...)` runs for this call: 'auto' is
    GPU_AUTO on a GPU in half precision and 'blocked' elsewhere; a kernel that cannot
    take the call (pallas without segment ids, or T not a multiple of its 128-row
    blocks; cudnn in float32 or with heads wider than 128 or not a multiple of 8)
    falls back to 'blocked'."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {IMPLS}")
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        impl = GPU_AUTO if jax.default_backend() == "gpu" and half else "blocked"
    if impl == "pallas" and (not has_segment_ids or (T > 128 and T % 128)):
        return "blocked"
    if impl == "cudnn" and (not half or head_dim > 128 or head_dim % 8):
        return "blocked"
    return impl


def causal_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    mask_BTT,
    num_blocks: int | None = None,
    *,
    segment_ids_BT=None,
    impl: str = "blocked",
):
    """`attention` for self-attention whose mask is causal (key s > query t never
    visible; segment or padding masks on top are fine). Same result, about half
    the work: query block i only meets keys up to its own end. segment_ids_BT, when
    given, must say the same as mask_BTT (causal within equal ids): the pallas
    kernel reads them instead of the mask."""
    B, T, N, H = q_BTNH.shape
    impl = resolve_impl(impl, q_BTNH.dtype, T, H, segment_ids_BT is not None)
    if impl == "cudnn":
        return _cudnn(q_BTNH, k_BTKH, v_BTKH, mask_BTT, segment_ids_BT)
    if impl == "pallas":
        return _pallas(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if attention_kernel.applies(q_BTNH, k_BTKH, v_BTKH):  # fp32 on one CPU device
        # Blocks of about 64 rows (at most 16 blocks): less work above the diagonal, and
        # the kernel's products on them cost no copies (fwd + bwd at llama-small's
        # shape: 27.7 ms a layer with 64 rows, 31.0 with 128, 29.3 with 32; llama-tiny's:
        # 7.5, 7.5 and 8.6 with 128).
        n = query_blocks(T, KERNEL_BLOCK_ROWS) if num_blocks is None else num_blocks
        return _causal_kernel(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT)
    n = query_blocks(T) if num_blocks is None else num_blocks
    return _causal(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT)


def unpacked_lengths(segment_ids_BT):
    """-> (lengths_B, whether every row is one segment of lengths_B tokens followed
    by padding only): then a causal mask plus sequence lengths says all the mask does."""
    T = segment_ids_BT.shape[1]
    lengths_B = jnp.sum(segment_ids_BT != 0, axis=1, dtype=jnp.int32)
    expected_BT = jnp.where(jnp.arange(T) < lengths_B[:, None], segment_ids_BT[:, :1], 0)
    return lengths_B, jnp.all(segment_ids_BT == expected_BT) & jnp.all(lengths_B > 0)


def _cudnn(q_BTNH, k_BTKH, v_BTKH, mask_BTT, segment_ids_BT):
    """cuDNN's fused attention. Batches of unpacked rows (one segment, then padding)
    take its causal + sequence-length mask, which skips the masked work; packed rows
    need the mask as an additive [B, 1, T, T] bias, whose gradient cuDNN then also
    computes (1.5x the time on an H200 at llama-1b's shape, benchmarks/README.md)."""

    def fused(**mask):
        return jax.nn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn", **mask
        )

    def biased():
        return fused(mask=mask_BTT[:, None])

    if segment_ids_BT is None:
        return biased()
    lengths_B, unpacked = unpacked_lengths(segment_ids_BT)
    lengths = dict(query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B)
    return jax.lax.cond(unpacked, lambda: fused(**lengths), biased)


def _pallas(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """JAX's Pallas flash attention (Triton on GPU; interpreted elsewhere, for tests)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # needs Triton

    G = q_BTNH.shape[2] // k_BTKH.shape[2]
    if G > 1:  # the kernel takes one key/value head per query head; head n reads n // G
        k_BTKH, v_BTKH = jnp.repeat(k_BTKH, G, axis=2), jnp.repeat(v_BTKH, G, axis=2)
    return pallas_attention.mha(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        segment_ids_BT,
        sm_scale=q_BTNH.shape[-1] ** -0.5,
        causal=True,
        interpret=jax.default_backend() != "gpu",
    )


def _to_heads(q_BTNH, k_BTKH, v_BTKH):
    """-> q_BKRH with rows r = t * G + g (so a block of queries is a block of rows),
    k_BKTH, v_BKTH."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BKRH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)
    return q_BKRH, k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)


def _block_mask(mask_BTT, i, rows, G):
    """Block i's mask [B, 1, rows * G, (i + 1) * rows], repeated over the G query
    heads of each key/value head."""
    m_BtS = mask_BTT[:, i * rows : (i + 1) * rows, : (i + 1) * rows]
    return jnp.repeat(m_BtS, G, axis=1)[:, None]


def mask_scores(s, keep):
    """Scores where `keep`, NEG_INF elsewhere, as s + bias, for XLA's softmax (ftlib's CPU
    kernel takes the bias itself, masked_softmax.cc): XLA:CPU fuses an add (not a select)
    into YNNPACK's fusion of the score product and softmax, which saves a pass over the
    scores per block (benchmarks/README.md). The barrier keeps XLA from folding the
    bias's select back into the add."""
    return s + jax.lax.optimization_barrier(jnp.where(keep, 0.0, NEG_INF))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _causal(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    return _causal_fwd(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT)[0]


def _causal_fwd(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    B, T, N, H = q_BTNH.shape
    G, rows = N // k_BTKH.shape[2], T // n
    q_BKRH, k_BKTH, v_BKTH = _to_heads(q_BTNH * (H**-0.5), k_BTKH, v_BTKH)
    outs, probs = [], []
    for i in range(n):
        q_i = q_BKRH[:, :, i * rows * G : (i + 1) * rows * G]
        end = (i + 1) * rows
        s = einsum("bkrh,bksh->bkrs", q_i, k_BKTH[:, :, :end], float32_result=True)
        keep = _block_mask(mask_BTT, i, rows, G)
        if masked_softmax.applies(s):
            p = masked_softmax.probs(s, jnp.where(keep[:, 0], 0.0, NEG_INF))
        else:
            p = jax.nn.softmax(mask_scores(s, keep), axis=-1)
        p = p.astype(v_BKTH.dtype)
        outs.append(einsum("bkrs,bksh->bkrh", p, v_BKTH[:, :, :end]))
        probs.append(p)
    o_BKRH = jnp.concatenate(outs, axis=2)
    out = o_BKRH.reshape(B, -1, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    return out, (q_BKRH, k_BKTH, v_BKTH, o_BKRH, probs, mask_BTT)


def _causal_bwd(n, res, dout_BTNH):
    q_BKRH, k_BKTH, v_BKTH, o_BKRH, probs, mask_BTT = res
    B, T, N, H = dout_BTNH.shape
    K = k_BKTH.shape[1]
    G, rows = N // K, T // n
    do_BKRH = (
        dout_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)
    ).astype(o_BKRH.dtype)
    # softmax backward: ds = p * (dp - sum_s p * dp), and sum_s p * dp = do . o
    delta_BKR = jnp.sum(do_BKRH.astype(jnp.float32) * o_BKRH.astype(jnp.float32), axis=-1)
    dqs, dk, dv = [], jnp.zeros(k_BKTH.shape, jnp.float32), jnp.zeros(v_BKTH.shape, jnp.float32)
    for i, p in enumerate(probs):
        r = slice(i * rows * G, (i + 1) * rows * G)
        end = (i + 1) * rows
        do_i, q_i = do_BKRH[:, :, r], q_BKRH[:, :, r]
        dv_i = einsum("bkrs,bkrh->bksh", p, do_i, float32_result=True)
        dp = einsum("bkrh,bksh->bkrs", do_i, v_BKTH[:, :, :end], float32_result=True)
        ds = (p.astype(jnp.float32) * (dp - delta_BKR[:, :, r, None])).astype(q_i.dtype)
        dqs.append(einsum("bkrs,bksh->bkrh", ds, k_BKTH[:, :, :end]))
        dk_i = einsum("bkrs,bkrh->bksh", ds, q_i, float32_result=True)
        dk = dk.at[:, :, :end].add(dk_i)
        dv = dv.at[:, :, :end].add(dv_i)
    dq_BKRH = jnp.concatenate(dqs, axis=2) * (H**-0.5)
    dq = dq_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    return (
        dq.astype(dout_BTNH.dtype),
        dk.transpose(0, 2, 1, 3).astype(k_BKTH.dtype),
        dv.transpose(0, 2, 1, 3).astype(v_BKTH.dtype),
        None,
    )


_causal.defvjp(_causal_fwd, _causal_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _causal_kernel(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    """`_causal` in ftlib.attention_kernel's C++ calls: the same blocks and saved
    probabilities, read and written in place in [B, T, heads, H]."""
    return attention_kernel.forward(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT)[0]


def _causal_kernel_fwd(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    out_BTNH, probs = attention_kernel.forward(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT)
    return out_BTNH, (q_BTNH, k_BTKH, v_BTKH, probs)


def _causal_kernel_bwd(n, res, dout_BTNH):
    return (*attention_kernel.backward(n, *res, dout_BTNH), None)


_causal_kernel.defvjp(_causal_kernel_fwd, _causal_kernel_bwd)
