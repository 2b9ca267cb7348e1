"""The LM head and its next-token cross-entropy in one pass over blocks of positions.

Why: the plain path writes [B, T, V] logits, then exp(logits - lse) for the
backward, then the [B, T, V] logit gradient; three buffers of 67 MB (llama-tiny)
to 262 MB (llama-small), each freshly allocated and page-faulted every step, and
every elementwise pass over them runs at memory speed. Here each block of
positions computes its logits, loss, and (under differentiation) its gradients
while the block's [B, t, V] slab is still in cache: the forward rule already
produces d(loss)/dh and d(loss)/dW for a unit cotangent, and the backward only
scales them. The matmul FLOPs are the same as autodiff's (nothing recomputed),
and the head's weight gradient is skipped when the weight is frozen. On one CPU device
in fp32 each block's softmax, loss and logit gradient is one C++ pass per row
(ftlib.softmax_xent); elsewhere XLA's ops (`_softmax_xent`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ftlib import mkl_gemm, softmax_xent


def block_rows(D: int) -> int:
    """Logits rows (B * t) per block for hidden size D, fitted on this project's CPU
    (benchmarks/README.md): with a small D the block is memory-bound and smaller slabs
    that stay in cache win (D=64, V=49k: 64 rows 15% faster than 256); with a large D
    the matmuls dominate and need M >= 256 (D=512, V=32k: 64 rows 12% slower).
    On accelerators the scan's per-block launches cost more than cache misses: 2048
    rows (256 MB of float32 logits at V=32k) keep the blocks few and the matmuls big."""
    if jax.default_backend() != "cpu":
        return 2048
    return min(256, max(64, D))


def block_positions(B: int, T: int, rows: int) -> int:
    """Positions t per block for a [B, T] batch: about `rows` logits rows, at least 1."""
    return max(1, min(T, rows // max(B, 1)))


def linear_cross_entropy(h_BTD, w, targets_BT, weight_BT, *, vocab_major=False, dtype=None):
    """-> (sum of weight * NLL, sum of weight * [argmax == target]) for logits =
    h @ w (w [D, V]; or w [V, D] with vocab_major, e.g. a tied embedding).

    The softmax runs in float32; the matmuls in `dtype` (default: h's). Positions
    with weight 0 cost their share of the matmuls but add nothing."""
    B, T, D = h_BTD.shape
    t = block_positions(B, T, block_rows(D))
    pad = -T % t
    if pad:
        widths = ((0, 0), (0, pad))
        h_BTD = jnp.pad(h_BTD, widths + ((0, 0),))
        targets_BT = jnp.pad(targets_BT, widths)
        weight_BT = jnp.pad(weight_BT, widths)
    dtype = jnp.dtype(dtype or h_BTD.dtype)
    return _fused(vocab_major, dtype, t, h_BTD, w, targets_BT, weight_BT.astype(jnp.float32))


def is_first_max(logits_NV, max_N, target_N):
    """argmax(logits, -1) == target (ties go to the first index, as argmax's do),
    without argmax's variadic (value, index) reduction, which XLA:CPU runs as a scalar
    loop: on a [256, 32000] block, max + exp + sum take 3.5 ms, 20 ms with argmax and
    11 ms with these keys (benchmarks/README.md). sign(logit - max) is 0 at a maximum
    and -1 elsewhere, so iota - V * sign is a maximum's own index and >= V elsewhere;
    its min is the first maximum's index. Plain float ops and a min: XLA vectorizes
    them (YNNPACK on CPU)."""
    V = logits_NV.shape[-1]
    if V >= 2**23:  # the float32 keys would no longer be exact integers
        return jnp.argmax(logits_NV, axis=-1) == target_N
    index_V = jnp.arange(V, dtype=jnp.float32)
    key_NV = index_V - V * jnp.sign(logits_NV - max_N[..., None])
    return jnp.min(key_NV, axis=-1) == target_N.astype(jnp.float32)


def _blocks(x_BT, t):
    """[B, T, ...] -> [T // t, B, t, ...]: the scan runs over blocks of positions."""
    B, T = x_BT.shape[:2]
    return jnp.moveaxis(x_BT.reshape(B, T // t, t, *x_BT.shape[2:]), 1, 0)


def _softmax_xent(logits_NV, tgt_N, wt_N, dtype):
    """XLA's ops for softmax_xent.rows -> ((nll sum, correct sum), g_NV in dtype); XLA
    drops g when no gradient uses it."""
    V = logits_NV.shape[-1]
    # One exp pass serves both the loss and the softmax of the gradient.
    max_N = jnp.max(logits_NV, axis=-1)
    exp_NV = jnp.exp(logits_NV - max_N[:, None])
    sum_N = jnp.sum(exp_NV, axis=-1)
    gold_N = jnp.take_along_axis(logits_NV, tgt_N[:, None], axis=-1)[:, 0]
    sums = (
        jnp.sum((max_N + jnp.log(sum_N) - gold_N) * wt_N),
        jnp.sum(is_first_max(logits_NV, max_N, tgt_N) * wt_N),
    )
    onehot_NV = jnp.arange(V)[None, :] == tgt_N[:, None]
    g_NV = (exp_NV * (wt_N / sum_N)[:, None] - onehot_NV * wt_N[:, None]).astype(dtype)
    return sums, g_NV


def _scan(vocab_major, dtype, t, h_BTD, w, targets_BT, weight_BT, need_dh, need_dw):
    """One pass over the blocks -> ((nll, correct), dh_BTD or None, dw or None), the
    gradients being those of nll for a unit cotangent."""
    D = h_BTD.shape[-1]
    V = w.shape[0] if vocab_major else w.shape[1]
    w_c = w.astype(dtype)  # cast once, not per block; the blocks get h cast too
    out_dtype = h_BTD.dtype  # dh's
    contract_w = 1 if vocab_major else 0  # w's D axis
    mkl = mkl_gemm.applies(w_c)  # h is cast to w_c's dtype: fp32 on one CPU device

    def block(dw_acc, xs):
        h_btD, tgt_bt, wt_bt = xs
        b = h_btD.shape[0]
        h_ND, tgt_N, wt_N = h_btD.reshape(-1, D), tgt_bt.reshape(-1), wt_bt.reshape(-1)
        if mkl:
            logits_NV = mkl_gemm.gemm(h_ND, w_c, transpose_b=vocab_major)
        else:
            logits_NV = jax.lax.dot_general(
                h_ND, w_c, (((1,), (contract_w,)), ((), ())), preferred_element_type=jnp.float32
            )
        if softmax_xent.applies(logits_NV):  # one C++ pass per row
            g_NV, nll_N, correct_N = softmax_xent.rows(
                logits_NV, tgt_N, wt_N, gradient=need_dh or need_dw
            )
            sums = (jnp.sum(nll_N), jnp.sum(correct_N))
            g_NV = g_NV.astype(dtype)
        else:
            sums, g_NV = _softmax_xent(logits_NV, tgt_N, wt_N, dtype)
        dh = None
        if need_dh or need_dw:
            if need_dh and mkl:
                dh = mkl_gemm.gemm(g_NV, w_c, transpose_b=not vocab_major)
                dh = dh.astype(out_dtype).reshape(b, -1, D)
            elif need_dh:
                # g @ w^T (or g @ w when vocab-major), contracted in place: no transposed copy.
                dims = (((1,), (1 - contract_w,)), ((), ()))
                dh = jax.lax.dot_general(g_NV, w_c, dims, preferred_element_type=jnp.float32)
                dh = dh.astype(out_dtype).reshape(b, -1, D)
            if need_dw and mkl:  # h^T read in place, g added into dw's buffer
                dw_acc = mkl_gemm.gemm_accumulate(dw_acc, h_ND, g_NV, transpose_a=True)
            elif need_dw:
                # Transposing h explicitly (the barrier keeps XLA from folding it back
                # into the dot) gives the faster GEMM layout on CPU, as in layers.matmul.
                h_DN = jax.lax.optimization_barrier(h_ND.T)
                dw_acc = dw_acc + jnp.dot(h_DN, g_NV, preferred_element_type=jnp.float32)
        return dw_acc, (sums, dh)

    dw0 = jnp.zeros((D, V), jnp.float32) if need_dw else None  # [D, V] either way
    xs = (_blocks(h_BTD.astype(dtype), t), _blocks(targets_BT, t), _blocks(weight_BT, t))
    dw, (sums, dh) = jax.lax.scan(block, dw0, xs)
    totals = (jnp.sum(sums[0]), jnp.sum(sums[1]))
    if dh is not None:
        dh = jnp.moveaxis(dh, 0, 1).reshape(h_BTD.shape)
    if dw is not None:
        dw = (dw.T if vocab_major else dw).astype(w.dtype)
    return totals, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(vocab_major, dtype, t, h_BTD, w, targets_BT, weight_BT):
    return _scan(vocab_major, dtype, t, h_BTD, w, targets_BT, weight_BT, False, False)[0]


def _fused_fwd(vocab_major, dtype, t, h_BTD, w, targets_BT, weight_BT):
    need_dh, need_dw = h_BTD.perturbed, w.perturbed
    totals, dh, dw = _scan(
        vocab_major,
        dtype,
        t,
        h_BTD.value,
        w.value,
        targets_BT.value,
        weight_BT.value,
        need_dh,
        need_dw,
    )
    return totals, (dh, dw)


def _fused_bwd(vocab_major, dtype, t, res, g):
    dh, dw = res
    g_nll = g[0]  # argmax has no gradient: the count's cotangent is ignored
    scale = lambda x: None if x is None else (x * g_nll).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
