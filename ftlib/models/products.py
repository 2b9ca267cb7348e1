"""Projections as products whose backward is handed their input: what lets a custom VJP
save one input for several projections, or recompute it, on ftlib's CPU kernels.

Under the layer scan every residual a layer saves is a stack, written, zero-filled and
sliced back out every step. As separate custom VJPs, q, k and v each save their common
input (three stacks of one array), gate and up theirs (two), and down_proj saves
swiglu(gate, up), which SwiGLU's backward can recompute while it reads gate and up.

A product (`MatmulProduct`, LoRA's `lora.AccumulatedProduct`) is a hashable object with
three methods, its backward split around the input it is given back:
  forward(x_NI, params) -> (y_NO, saved), saved not holding x;
  input_grad(params, saved, g_NO, dx_NI=None) -> (dx_NI, carry), dx added into the
    given dx's buffer when there is one (MKL's beta = 1: no separate add pass);
  param_grads(x_NI, params, saved, carry, g_NO) -> the params' gradients.
A module offers its call as one through `as_product(rng)` -> (product, params), or None
(a bias, dropout, an adapter that is not a product); a frozen weight under the layer
stack comes as a LayerView, which the products read in place. Products run in MKL: the custom
VJPs here apply on ftlib's CPU kernels only (fp32, one CPU device); elsewhere the
modules' own calls run. When params are frozen their gradients are unused and XLA drops
those products.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from ftlib import mkl_gemm, swiglu_backward
from ftlib.layer_view import cotangent_like


@dataclasses.dataclass(frozen=True)
class MatmulProduct:
    """x @ w (params (w,)), a plain Linear's call."""

    def forward(self, x_NI, params):
        (w_IO,) = params
        return mkl_gemm.gemm(x_NI, w_IO), ()

    def input_grad(self, params, saved, g_NO, dx_NI=None):
        (w_IO,) = params
        return mkl_gemm.gemm_accumulate(dx_NI, g_NO, w_IO, transpose_b=True), None

    def param_grads(self, x_NI, params, saved, carry, g_NO):
        return (mkl_gemm.gemm(x_NI, g_NO, transpose_a=True),)


def _found(modules, rngs):
    """-> [(product, params)] for modules that all offer one, else None."""
    found = []
    for module, rng in zip(modules, rngs, strict=True):
        as_product = getattr(module, "as_product", None)
        product = as_product(rng) if as_product else None
        if product is None:
            return None
        found.append(product)
    return found


def _applies(inputs, params) -> bool:
    """MKL's products on these inputs and 2-D params."""
    return all(p.ndim == 2 for p in params) and mkl_gemm.applies(*inputs, *params)


def shared_input_applies(x_TI, params) -> bool:
    """Whether shared_input_products runs on x and these modules' params."""
    return _applies([x_TI], [p for ps in params for p in ps])


def project(modules, x_TI, rngs):
    """[module(x, rng=rng) for each module]: as one custom VJP that saves x once
    (shared_input_products) where every module offers a product and it applies."""
    found = _found(modules, rngs)
    params = found and tuple(p for _, p in found)
    if found and shared_input_applies(x_TI, params):
        return shared_input_products(tuple(prod for prod, _ in found), x_TI, params)
    return [module(x_TI, rng=rng) for module, rng in zip(modules, rngs, strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def shared_input_products(products, x_TI, params):
    """[product.forward(x, p) for each (product, p)], x saved once for all of them, and
    its gradient summed in one buffer: q, k, v (and gate, up) as separate custom VJPs
    save x once each and XLA adds their dx's in passes of their own."""
    return _shared_fwd(products, x_TI, params)[0]


def _shared_fwd(products, x_TI, params):
    x_NI = x_TI.reshape(-1, x_TI.shape[-1])
    outs, saved = [], []
    for product, p in zip(products, params, strict=True):
        y_NO, s = product.forward(x_NI, p)
        outs.append(y_NO.reshape(*x_TI.shape[:-1], -1))
        saved.append(s)
    return outs, (x_NI, params, tuple(saved))


def _shared_bwd(products, res, gs):
    x_NI, params, saved = res
    dx_NI, carries, gs_NO = None, [], []
    for product, p, s, g in zip(products, params, saved, gs, strict=True):
        gs_NO.append(g.reshape(-1, g.shape[-1]))
        dx_NI, carry = product.input_grad(p, s, gs_NO[-1], dx_NI)
        carries.append(carry)
    grads = tuple(
        tuple(map(cotangent_like, p, product.param_grads(x_NI, p, s, c, g)))
        for product, p, s, c, g in zip(products, params, saved, carries, gs_NO, strict=True)
    )
    shape = (*gs[0].shape[:-1], x_NI.shape[-1])
    return dx_NI.reshape(shape), grads


shared_input_products.defvjp(_shared_fwd, _shared_bwd)


def swiglu_product_applies(gate_TF, up_TF, params) -> bool:
    """Whether swiglu_product runs: SwiGLU's backward kernel and MKL's products."""
    return swiglu_backward.applies(gate_TF, up_TF, gate_TF) and _applies([gate_TF, up_TF], params)


def down_projection(module, gate_TF, up_TF, rng):
    """module(swiglu(gate, up), rng=rng) (Llama's MLP after its gate and up products) as
    swiglu_product where the module offers a product and it applies; else None."""
    found = _found([module], [rng])
    if found and swiglu_product_applies(gate_TF, up_TF, found[0][1]):
        return swiglu_product(found[0][0], gate_TF, up_TF, found[0][1])
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def swiglu_product(product, gate_TF, up_TF, params):
    """product(swiglu(gate, up), params), saving gate, up, params and the product's own
    small residuals, not h = swiglu(gate, up): SwiGLU's backward kernel recomputes h for
    the params' gradients in the pass that reads gate and up anyway (paired full
    fine-tuning steps ~3% faster on llama-small, ~2% on llama-tiny; LoRA ~4% on
    llama-tiny, 1-2% on llama-small: benchmarks/README.md)."""
    return _swiglu_product_fwd(product, gate_TF, up_TF, params)[0]


def _swiglu_product_fwd(product, gate_TF, up_TF, params):
    # layers.swiglu's forward, written out: layers imports this module (Linear.as_product).
    h_NF = (jax.nn.silu(gate_TF) * up_TF).reshape(-1, gate_TF.shape[-1])
    y_NO, saved = product.forward(h_NF, params)
    return y_NO.reshape(*gate_TF.shape[:-1], -1), (gate_TF, up_TF, params, saved)


def _swiglu_product_bwd(product, res, g_TO):
    gate_TF, up_TF, params, saved = res
    g_NO = g_TO.reshape(-1, g_TO.shape[-1])
    dh_NF, carry = product.input_grad(params, saved, g_NO)
    dh_TF = dh_NF.reshape(gate_TF.shape)
    dgate, dup, h_TF = swiglu_backward.backward(gate_TF, up_TF, dh_TF, with_h=True)
    dparams = product.param_grads(h_TF.reshape(dh_NF.shape), params, saved, carry, g_NO)
    return dgate, dup, tuple(map(cotangent_like, params, dparams))


swiglu_product.defvjp(_swiglu_product_fwd, _swiglu_product_bwd)
