"""LoRA (Hu et al. 2021): y = x W + scale * dropout(x) A^T B, B zero-initialised.

Surgery wraps every Linear whose module path matches `target_modules`; the
wrapped layer keeps its base kernel (frozen by the mask) under `base`. The
wrapper is mergeable (see ftlib.peft.merging): `merged_kernel()` is W + scale A^T B.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftlib import mkl_gemm
from ftlib.layer_view import cotangent_like
from ftlib.models.layers import Linear, accumulation_dtype, dot, einsum, param
from ftlib.peft.surgery import replace_modules


class LoRALinear(nnx.Module):
    def __init__(
        self, base: Linear, rank: int, alpha: float, dropout: float, rslora: bool, *, rngs: nnx.Rngs
    ):
        kernel = base.kernel
        *lead, d_in, d_out = kernel.shape
        *lead_axes, in_axis, out_axis = kernel.get_metadata()["logical_axes"]
        dtype = kernel.dtype
        # HF PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / math.sqrt(d_in)
        init_a = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
        self.base = base
        # A is [rank, d_in] and B [rank, d_out]: PEFT's lora_A layout and lora_B transposed,
        # stacked over layers like the base kernel.
        self.lora_a = param(
            rngs, init_a, (*lead, rank, d_in), (*lead_axes, "lora_rank", in_axis), dtype
        )
        self.lora_b = param(
            rngs,
            nnx.initializers.zeros,
            (*lead, rank, d_out),
            (*lead_axes, "lora_rank", out_axis),
            dtype,
        )
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = dropout

    def __call__(self, x, rng=None):
        x_drop = dropout(x, self.dropout, rng)
        y = self._one_product(x, x_drop)
        if y is None:
            return self.base(x) + self.lora_path(x_drop)
        return y if self.base.bias is None else y + self.base.bias[...].astype(y.dtype)

    def _one_product(self, x, x_drop):
        """x W + scale x_drop A^T B as one custom VJP, in the layer's compute dtype (as
        Linear casts): accumulated into the base product where MKL runs the products,
        inside it where adapter_in_base_product says; else None (two products and an
        add). A stacked [layers, ...] kernel always takes the two products."""
        kernel = self.base.kernel.get_value()  # a LayerView stays one (layer_stack)
        if kernel.ndim != 2:
            return None
        dt = self.base.dtype
        factors = self._factors()
        xd = None if x_drop is x else x_drop.astype(dt)  # None: the adapter sees x itself
        x = x.astype(dt)
        adapter_input = x if xd is None else xd
        if adapter_accumulated(x, adapter_input, *factors):
            return accumulated_product(self.scale, x, xd, *factors)
        if adapter_in_base_product(*kernel.shape):
            return in_product(self.scale, x, adapter_input, *factors)
        return None

    def as_product(self, rng=None):
        """-> (product, params) for ftlib.models.products: this layer's call as an
        AccumulatedProduct; None with a bias, with dropout active, where the adapter is
        not accumulated, or in a subclass with a call of its own (DoRA)."""
        kernel = self.base.kernel.get_value()  # a LayerView stays one (layer_stack)
        dropping = self.dropout != 0 and rng is not None  # as in `dropout`
        own_call = type(self).__call__ is not LoRALinear.__call__
        if self.base.bias is not None or dropping or own_call:
            return None
        factors = self._factors()
        if kernel.ndim != 2 or not adapter_accumulated(*factors):
            return None
        return AccumulatedProduct(self.scale), factors

    def _factors(self):
        """(W, A, B) in the layer's compute dtype, as Linear casts."""
        dt = self.base.dtype
        factors = (self.base.kernel.get_value(), self.lora_a[...], self.lora_b[...])
        return tuple(f.astype(dt) for f in factors)

    def lora_path(self, x):
        """scale * x A^T B for the (already dropped-out) input x."""
        dt = self.base.dtype
        return lora_product(
            self.scale, x.astype(dt), self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
        )

    def delta_kernel(self):
        """scale A^T B, [*layers, in, out] like the base kernel."""
        return self.scale * (jnp.swapaxes(self.lora_a[...], -1, -2) @ self.lora_b[...])

    def merged_kernel(self):
        """W + scale A^T B: the kernel of an equivalent plain Linear."""
        return self.base.kernel[...] + self.delta_kernel()

    def merged_bias(self):
        return None if self.base.bias is None else self.base.bias[...]

    def unmerged(self, kernel, bias):
        """Inverse of (merged_kernel, merged_bias): the base kernel and bias."""
        return kernel - self.delta_kernel(), bias


# dot_general dimension numbers contracting two [tokens, ...] operands over tokens.
OVER_TOKENS = (((0,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_product(scale: float, x_TD, a_RD, b_RO):
    """scale * x A^T B, with the rank-r intermediate scaled (one small multiply)."""
    return _lora_product_fwd(scale, x_TD, a_RD, b_RO)[0]


def _lora_product_fwd(scale, x_TD, a_RD, b_RO):
    if a_RD.ndim == 2 and mkl_gemm.applies(x_TD, a_RD, b_RO):  # fp32 on one CPU device
        lead = x_TD.shape[:-1]
        xa_NR = mkl_gemm.gemm(x_TD.reshape(-1, x_TD.shape[-1]), a_RD, transpose_b=True) * scale
        y_NO = mkl_gemm.gemm(xa_NR, b_RO)
        return y_NO.reshape(*lead, -1), (x_TD, a_RD, b_RO, xa_NR.reshape(*lead, -1))
    xa_TR = einsum("...d,rd->...r", x_TD, a_RD) * scale
    return dot(xa_TR, b_RO), (x_TD, a_RD, b_RO, xa_TR)


def _lora_product_bwd(scale, res, g_TO):
    """dA and dB contract the token dim of a rank-r operand and a big one directly.
    An earlier version transposed the rank-r factors first (behind an optimization
    barrier, so XLA would not move the transpose onto the big operand); with
    today's XLA:CPU the direct contraction is faster: paired step-time ratios 0.948
    and 0.970 (llama-tiny LoRA), 0.968 and 0.996 (llama-small LoRA),
    benchmarks/README.md."""
    x_TD, a_RD, b_RO, xa_TR = res
    x_ND, g_NO = x_TD.reshape(-1, x_TD.shape[-1]), g_TO.reshape(-1, g_TO.shape[-1])
    xa_NR = xa_TR.reshape(-1, xa_TR.shape[-1])
    if a_RD.ndim == 2 and mkl_gemm.applies(x_ND, g_NO, a_RD, b_RO):  # operands read in place
        dxa_NR, da_RD, db_RO = _mkl_factor_grads(scale, g_NO, x_ND, xa_NR, b_RO)
        return mkl_gemm.gemm(dxa_NR, a_RD).reshape(x_TD.shape), da_RD, db_RO
    dxa_NR = dot(g_NO, b_RO.T) * scale
    dx_ND, da_RD, db_RO = _factor_grads(dxa_NR, x_ND, xa_NR, g_NO, a_RD, b_RO.dtype)
    return dx_ND.reshape(x_TD.shape), da_RD, db_RO


def _mkl_factor_grads(scale, g_NO, x_ND, xa_NR, b_RO):
    """MKL's products for the adapter path's gradients: -> (dxa = d(loss)/d(s x A^T) =
    s g B^T, dA = dxa^T x, dB = xa^T g); x is the adapter's input, xa = s x A^T."""
    dxa_NR = mkl_gemm.gemm(g_NO, b_RO, transpose_b=True) * scale
    return (dxa_NR, *_mkl_ab_grads(dxa_NR, x_ND, xa_NR, g_NO))


def _mkl_ab_grads(dxa_NR, x_ND, xa_NR, g_NO):
    """-> (dA = dxa^T x, dB = xa^T g) in MKL."""
    da_RD = mkl_gemm.gemm(dxa_NR, x_ND, transpose_a=True)
    return da_RD, mkl_gemm.gemm(xa_NR, g_NO, transpose_a=True)


def _factor_grads(dxa_NR, x_ND, xa_NR, g_NO, a_RD, b_dtype):
    """XLA's products for the adapter path's gradients given dxa = d(loss)/d(s x A^T):
    -> (its dx [N, D], dA, dB); x is the adapter's input, xa = s x A^T."""
    acc = accumulation_dtype(x_ND, g_NO)
    da_RD = jax.lax.dot_general(dxa_NR, x_ND, OVER_TOKENS, preferred_element_type=acc)
    db_RO = jax.lax.dot_general(xa_NR, g_NO, OVER_TOKENS, preferred_element_type=acc)
    return dot(dxa_NR, a_RD), da_RD.astype(a_RD.dtype), db_RO.astype(b_dtype)


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


def adapter_accumulated(*operands) -> bool:
    """Whether LoRALinear adds the adapter's product into the base product's output
    (`accumulated_product`): where these operands' products run in MKL."""
    return mkl_gemm.applies(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def accumulated_product(scale: float, x_TD, xd_TD, w_DO, a_RD, b_RO):
    """x W + scale (xd A^T) B in MKL (fp32 on one CPU device: the caller checks
    mkl_gemm.applies), the adapter's product added into the base product's output
    buffer (MKL's beta = 1). xd is the adapter's input (x after dropout), None when it
    is x itself: then the adapter's dx is accumulated into the base's dx as well. As
    two products and an add, XLA fuses the add into every consumer of the sum, each of
    which then reads both [tokens, out] arrays (llama-small LoRA: the gate and up sums
    in five fusions). Paired llama-small LoRA steps: 1-5% faster; llama-tiny's within
    the noise (benchmarks/README.md). XLA drops the dW product when W is frozen."""
    return _accumulated_product_fwd(scale, x_TD, xd_TD, w_DO, a_RD, b_RO)[0]


def _accumulated_product_fwd(scale, x_TD, xd_TD, w_DO, a_RD, b_RO):
    x_ND = x_TD.reshape(-1, x_TD.shape[-1])
    xd_ND = None if xd_TD is None else xd_TD.reshape(x_ND.shape)
    params = (w_DO, a_RD, b_RO)
    y_NO, (xa_NR,) = AccumulatedProduct(scale).forward(x_ND, params, xd_ND)
    y_TO = y_NO.reshape(*x_TD.shape[:-1], w_DO.shape[-1])
    return y_TO, (x_ND, xd_TD, params, xa_NR)


def _accumulated_product_bwd(scale, res, g_TO):
    x_ND, xd_TD, params, xa_NR = res
    g_NO = g_TO.reshape(-1, g_TO.shape[-1])
    product = AccumulatedProduct(scale)
    if xd_TD is None:  # the adapter's dx accumulated into the base's
        dx_ND, dxa_NR = product.input_grad(params, (xa_NR,), g_NO)
        grads, dxd_TD = product.param_grads(x_ND, params, (xa_NR,), dxa_NR, g_NO), None
    else:
        w_DO, a_RD, b_RO = params
        dxa_NR, da_RD, db_RO = _mkl_factor_grads(
            scale, g_NO, xd_TD.reshape(x_ND.shape), xa_NR, b_RO
        )
        dx_ND = mkl_gemm.gemm(g_NO, w_DO, transpose_b=True)
        dxd_TD = mkl_gemm.gemm(dxa_NR, a_RD).reshape(xd_TD.shape)
        grads = (mkl_gemm.gemm(x_ND, g_NO, transpose_a=True), da_RD, db_RO)
    grads = map(cotangent_like, params, grads)  # a frozen W may be a LayerView
    return (dx_ND.reshape(*g_TO.shape[:-1], x_ND.shape[-1]), dxd_TD, *grads)


@dataclasses.dataclass(frozen=True)
class AccumulatedProduct:
    """accumulated_product's products with the adapter seeing x itself (no dropout), as
    a product of ftlib.models.products (params (W, A, B)): LoRA's projections then share
    their saved input (q, k, v; gate, up), and down_proj saves A's small product xa, not
    its input."""

    scale: float

    def forward(self, x_ND, params, xd_ND=None):
        """-> (x W + scale (xd A^T) B, (xa = scale xd A^T,)); xd None: x itself."""
        w_DO, a_RD, b_RO = params
        xa_NR = mkl_gemm.gemm(x_ND if xd_ND is None else xd_ND, a_RD, transpose_b=True)
        xa_NR = xa_NR * self.scale
        return mkl_gemm.gemm_accumulate(mkl_gemm.gemm(x_ND, w_DO), xa_NR, b_RO), (xa_NR,)

    def input_grad(self, params, saved, g_NO, dx_ND=None):
        """-> ((dx +) g W^T + dxa A, every term added in one buffer; dxa)."""
        w_DO, a_RD, b_RO = params
        dxa_NR = mkl_gemm.gemm(g_NO, b_RO, transpose_b=True) * self.scale
        dx_ND = mkl_gemm.gemm_accumulate(dx_ND, g_NO, w_DO, transpose_b=True)
        return mkl_gemm.gemm_accumulate(dx_ND, dxa_NR, a_RD), dxa_NR

    def param_grads(self, x_ND, params, saved, dxa_NR, g_NO):
        """-> (dW, dA, dB); XLA drops dW when W is frozen."""
        dw_DO = mkl_gemm.gemm(x_ND, g_NO, transpose_a=True)
        return (dw_DO, *_mkl_ab_grads(dxa_NR, x_ND, saved[0], g_NO))


accumulated_product.defvjp(_accumulated_product_fwd, _accumulated_product_bwd)


def adapter_in_base_product(d_in: int, d_out: int) -> bool:
    """Whether LoRALinear computes x W + s x A^T B as one product (`in_product`) rather
    than two products and an add. On a GPU, for projections wider out than in (llama's
    gate and up): there the adapter's [tokens, out] product, written and read back by the
    add, costs more than copying x into the concatenated operand. Paired llama-1b LoRA
    steps in bf16 on an H200, against two products everywhere: 0.973, 0.983 and 0.988
    (gate and up only), 0.985 (also q and o), 1.003 (every projection);
    benchmarks/README.md. On the CPU the fp32 products run in MKL (ftlib.mkl_gemm), where
    the one product measured 0.996 to 1.05 against two, and where LoRALinear adds the
    adapter's product into the base's output instead (`accumulated_product`); TPUs were
    not measured."""
    return d_out > d_in and jax.default_backend() == "gpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def in_product(scale: float, x_TD, xd_TD, w_DO, a_RD, b_RO):
    """x W + scale (xd A^T) B as [x | scale xd A^T] @ [W; B]: one GEMM with K = D + r,
    the adapter's contribution added in its accumulator. xd is the adapter's input
    (x after dropout); dW is dropped by XLA when W is frozen."""
    return _in_product_fwd(scale, x_TD, xd_TD, w_DO, a_RD, b_RO)[0]


def _in_product_fwd(scale, x_TD, xd_TD, w_DO, a_RD, b_RO):
    xa_TR = einsum("...d,rd->...r", xd_TD, a_RD) * scale
    wb_KO = jnp.concatenate([w_DO, b_RO], axis=0)
    y_TO = dot(jnp.concatenate([x_TD, xa_TR], axis=-1), wb_KO)
    return y_TO, (x_TD, xd_TD, a_RD, xa_TR, wb_KO)


def _in_product_bwd(scale, res, g_TO):
    x_TD, xd_TD, a_RD, xa_TR, wb_KO = res
    D = x_TD.shape[-1]
    x_ND, xd_ND = x_TD.reshape(-1, D), xd_TD.reshape(-1, D)
    g_NO, xa_NR = g_TO.reshape(-1, g_TO.shape[-1]), xa_TR.reshape(-1, xa_TR.shape[-1])
    dxc_NK = dot(g_NO, wb_KO.T)  # [g W^T | g B^T] in one product
    dxa_NR = dxc_NK[:, D:] * scale
    dxd_ND, da_RD, db_RO = _factor_grads(dxa_NR, xd_ND, xa_NR, g_NO, a_RD, wb_KO.dtype)
    acc = accumulation_dtype(x_ND, g_NO)
    dw_DO = jax.lax.dot_general(x_ND, g_NO, OVER_TOKENS, preferred_element_type=acc)
    shape = x_TD.shape
    return (
        dxc_NK[:, :D].reshape(shape),
        dxd_ND.reshape(shape),
        dw_DO.astype(wb_KO.dtype),
        da_RD,
        db_RO,
    )


in_product.defvjp(_in_product_fwd, _in_product_bwd)


def dropout(x, rate: float, rng):
    """Inverted dropout on the adapter input; identity at eval (no rng) or rate 0."""
    if rate == 0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    replace_modules(
        model,
        cfg.lora.target_modules,
        Linear,
        lambda base: LoRALinear(
            base, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.rslora, rngs=rngs
        ),
    )


OPTIONS = ("rank", "alpha", "dropout", "rslora", "target_modules")

# Only the adapter factors train; anything else the user marks in peft.trainable.
TRAINABLE_RULES = ((r".*/lora_(a|b)$", True), (r".*", False))
