"""An experiment for paired_ab.py (variant `recompute_probs`): the blocked causal
attention saves each query block's log-sum-exp and recomputes its probabilities in
the backward (one more score product and exp per block), instead of saving them.

ftlib's `_causal` keeps every block's [B, K, rows, end] probabilities for the
backward: 21 MB per layer at llama-small's shape, written into the layer scan's
stacked residuals and read back, which a CPU profile puts at ~90 ms of op time per
step (zero-fill, writes, reads). Recomputing trades that for a product and an exp
pass; it also keeps the residuals linear in T. Not the library's path until a
paired run says so (benchmarks/README.md).
"""

import jax
import jax.numpy as jnp

from ftlib.models import attention
from ftlib.models.layers import accumulation_dtype


def _scores(q_BKrH, k_BKTH, mask_BTT, i, rows, G):
    """Block i's masked scores [B, K, rows * G, (i + 1) * rows], as `_causal_fwd`'s."""
    end = (i + 1) * rows
    s = jnp.einsum(
        "bkrh,bksh->bkrs", q_BKrH, k_BKTH[:, :, :end], preferred_element_type=jnp.float32
    )
    return attention.mask_scores(s, attention._block_mask(mask_BTT, i, rows, G))


def _fwd(n, q_BTNH, k_BTKH, v_BTKH, mask_BTT):
    B, T, N, H = q_BTNH.shape
    G, rows = N // k_BTKH.shape[2], T // n
    q_BKRH, k_BKTH, v_BKTH = attention._to_heads(q_BTNH * (H**-0.5), k_BTKH, v_BTKH)
    acc = accumulation_dtype(q_BKRH, v_BKTH)
    outs, lses = [], []
    for i in range(n):
        s = _scores(q_BKRH[:, :, i * rows * G : (i + 1) * rows * G], k_BKTH, mask_BTT, i, rows, G)
        max_ = jnp.max(s, axis=-1, keepdims=True)
        exp = jnp.exp(s - max_)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        p = (exp / total).astype(v_BKTH.dtype)
        o_i = jnp.einsum(
            "bkrs,bksh->bkrh", p, v_BKTH[:, :, : (i + 1) * rows], preferred_element_type=acc
        )
        outs.append(o_i.astype(v_BKTH.dtype))
        lses.append(max_ + jnp.log(total))
    o_BKRH = jnp.concatenate(outs, axis=2)
    out = o_BKRH.reshape(B, -1, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    return out, (q_BKRH, k_BKTH, v_BKTH, o_BKRH, lses, mask_BTT)


def _bwd(n, res, dout_BTNH):
    """The probabilities again from the saved log-sum-exps, then `_causal_bwd`."""
    q_BKRH, k_BKTH, v_BKTH, o_BKRH, lses, mask_BTT = res
    T, N = dout_BTNH.shape[1:3]
    G, rows = N // k_BKTH.shape[1], T // n
    probs = [
        jnp.exp(
            _scores(q_BKRH[:, :, i * rows * G : (i + 1) * rows * G], k_BKTH, mask_BTT, i, rows, G)
            - lse
        ).astype(v_BKTH.dtype)
        for i, lse in enumerate(lses)
    ]
    res = (q_BKRH, k_BKTH, v_BKTH, o_BKRH, probs, mask_BTT)
    return attention._causal_bwd(n, res, dout_BTNH)


causal = jax.custom_vjp(attention._causal.fun, nondiff_argnums=(0,))
causal.defvjp(_fwd, _bwd)
