"""An experiment for paired_ab.py (variant `adapter_in_product`): LoRA with the adapter
inside the base product, y = [x | s x A^T] @ [W; B], one GEMM with K = D + r.

ftlib's LoRALinear computes x W and s (x A^T) B as two products and adds them: the
adapter's [tokens, out] product is written and read back by the add (or by every
consumer the add is fused into), once per adapted projection and layer. On an H100,
LoRA's llama-1b step spends 46 of 198 GPU ms in bandwidth-bound fusions
(benchmarks/README.md); this removes that output-sized pass at the price of copying
x (and W) into the concatenated operands. The backward likewise gets g W^T and g B^T
from one product with [W; B]^T. Not the library's path until a paired run says so.
"""

import functools

import jax
import jax.numpy as jnp

from ftlib.peft.lora import OVER_TOKENS


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def adapter_in_product(scale: float, x_TD, w_DO, a_RD, b_RO):
    """x W + scale (x A^T) B over the last dim of x."""
    return _fwd(scale, x_TD, w_DO, a_RD, b_RO)[0]


def _fwd(scale, x_TD, w_DO, a_RD, b_RO):
    xa_TR = jnp.einsum("...d,rd->...r", x_TD, a_RD) * scale
    wb_KO = jnp.concatenate([w_DO, b_RO], axis=0)  # K = D + r
    y_TO = jnp.dot(jnp.concatenate([x_TD, xa_TR], axis=-1), wb_KO)
    return y_TO, (x_TD, a_RD, xa_TR, wb_KO)


def _bwd(scale, res, g_TO):
    x_TD, a_RD, xa_TR, wb_KO = res
    D = x_TD.shape[-1]
    x_ND, g_NO = x_TD.reshape(-1, D), g_TO.reshape(-1, g_TO.shape[-1])
    dxc_NK = jnp.dot(g_NO, wb_KO.T)  # [g W^T | g B^T] in one product
    dxa_NR = dxc_NK[:, D:] * scale
    dx_TD = (dxc_NK[:, :D] + jnp.dot(dxa_NR, a_RD)).reshape(x_TD.shape)
    da_RD = jax.lax.dot_general(dxa_NR, x_ND, OVER_TOKENS)
    db_RO = jax.lax.dot_general(xa_TR.reshape(-1, xa_TR.shape[-1]), g_NO, OVER_TOKENS)
    dw_DO = jax.lax.dot_general(x_ND, g_NO, OVER_TOKENS)  # dropped by XLA when W is frozen
    return dx_TD, dw_DO, da_RD, db_RO


adapter_in_product.defvjp(_fwd, _bwd)


def lora_call(layer, x, rng=None):
    """LoRALinear.__call__ through adapter_in_product (no dropout, no bias: the
    benchmark's LoRA)."""
    del rng
    if layer.dropout or layer.base.bias is not None:
        raise ValueError("adapter_in_product covers LoRA without dropout or bias")
    dt = layer.base.dtype
    return adapter_in_product(
        layer.scale,
        x.astype(dt),
        layer.base.kernel[...].astype(dt),
        layer.lora_a[...].astype(dt),
        layer.lora_b[...].astype(dt),
    )


def lora_call_wide(layer, x, rng=None):
    """adapter_in_product only where a projection's output is wider than its input
    (llama's gate and up): there the adapter's output-sized pass costs more than copying
    x into the concatenated operand; elsewhere (q, k, v, o, down) the library's two
    products."""
    d_in, d_out = layer.base.kernel.shape[-2:]
    if d_out > d_in:
        return lora_call(layer, x, rng)
    if layer.dropout:
        raise ValueError("adapter_in_product covers LoRA without dropout")
    return layer.base(x) + layer.lora_path(x)
