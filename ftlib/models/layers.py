"""Building blocks shared by the models: Linear, RMSNorm, Embed, RoPE, attention.

Every parameter carries `logical_axes` metadata (MaxText style): names such as
'embed', 'mlp', 'heads', 'vocab'. ftlib.sharding maps them to mesh axes through
one rules table, so models never mention mesh axes. Stacked (scanned) layers
get a leading 'layers' axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from ftlib import mkl_gemm, rms_norm_kernel, rope_kernel, swiglu_backward
from ftlib.models import products

DEFAULT_INIT = nnx.initializers.normal(0.02)


def param(rngs, init, shape, axes, dtype) -> nnx.Param:
    """A Param with its logical axis names; `axes` must name every dimension."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def stacked(num_layers: int | None, shape, axes):
    """Shape and axes with a leading 'layers' dim when the module is scanned."""
    if num_layers is None:
        return tuple(shape), tuple(axes)
    return (num_layers, *shape), ("layers", *axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel_[L]IO with logical axes (in_axis, out_axis)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str, str],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        num_layers: int | None = None,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        init=DEFAULT_INIT,
    ):
        shape, kaxes = stacked(num_layers, (d_in, d_out), axes)
        self.kernel = param(rngs, init, shape, kaxes, param_dtype)
        if use_bias:
            bshape, baxes = stacked(num_layers, (d_out,), axes[1:])
            self.bias = param(rngs, nnx.initializers.zeros, bshape, baxes, param_dtype)
        else:
            self.bias = None
        self.dtype = dtype

    def __call__(self, x, rng=None):
        del rng  # only adapters that replace this layer use randomness (e.g. LoRA dropout)
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def as_product(self, rng=None):
        """-> (product, params) for ftlib.models.products: this layer's call as a
        MatmulProduct; None with a bias."""
        del rng
        if self.bias is not None:
            return None
        # get_value(), not [...]: a LayerView stays one (layer_stack)
        return products.MatmulProduct(), (self.kernel.get_value().astype(self.dtype),)


def dot(a, b):
    """jnp.dot(a, b) in the inputs' dtype. On CPU, half-precision products accumulate
    into a float32 result that is cast after: XLA:CPU gives bf16 x bf16 products its
    fast kernels (YNNPACK: AVX-512-BF16, AMX) only with a float32 result; with a bf16
    result they run in Eigen at 3-4x the time (a 2-vCPU Xeon: 212 against 805 GFLOP/s
    at [2048, 512] x [512, 1376], benchmarks/README.md). Accelerators keep jnp.dot,
    whose GEMMs accumulate in float32 anyway."""
    out_dtype = jnp.result_type(a, b)
    return jnp.dot(a, b, preferred_element_type=accumulation_dtype(a, b)).astype(out_dtype)


def einsum(spec: str, a, b, *, float32_result: bool = False):
    """jnp.einsum(spec, a, b) in the inputs' dtype (or float32), accumulating as `dot`
    does. Batched matmuls of fp32 operands (`mkl_gemm.einsum_transposes`, e.g. the
    attention's) run in MKL where `mkl_gemm.applies`: XLA:CPU's kernels run those
    small [128, S] x [S, 64] products at ~60-100 GFLOP/s (benchmarks/README.md)."""
    transposes = mkl_gemm.einsum_transposes(spec)
    same_batch = a.ndim == b.ndim and a.shape[:-2] == b.shape[:-2]  # no broadcasting
    if transposes is not None and same_batch and mkl_gemm.applies(a, b):
        return mkl_gemm.gemm(a, b, transpose_a=transposes[0], transpose_b=transposes[1])
    if float32_result:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    out_dtype = jnp.result_type(a, b)
    acc = accumulation_dtype(a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(out_dtype)


def accumulation_dtype(*operands):
    """The preferred_element_type of a product of these operands, as `dot` picks it:
    float32 on CPU when they are bf16 or fp16, else None (their own dtype)."""
    half = jnp.result_type(*operands) in (jnp.bfloat16, jnp.float16)
    if half and jax.default_backend() == "cpu":
        return jnp.float32
    return None


@jax.custom_vjp
def matmul(x_TI, w_IO):
    """x @ w over the last dim of x, with a backward that XLA compiles well on CPU.
    fp32 products on one CPU device run in MKL (ftlib.mkl_gemm) when it is available."""
    return _matmul_fwd(x_TI, w_IO)[0]


def _matmul_fwd(x_TI, w_IO):
    if w_IO.ndim == 2 and mkl_gemm.applies(x_TI, w_IO):
        y_NO = mkl_gemm.gemm(x_TI.reshape(-1, x_TI.shape[-1]), w_IO)
        return y_NO.reshape(*x_TI.shape[:-1], w_IO.shape[-1]), (x_TI, w_IO)
    return dot(x_TI, w_IO), (x_TI, w_IO)


def _matmul_bwd(res, g_TO):
    """Autodiff's dw contracts x and g over their leading (token) dim, and XLA then
    transposes one of them in memory, often the wide gradient, fused with the
    elementwise work that produces it (a slow strided loop on CPU). Transposing x
    explicitly (the barrier stops XLA folding it back into the dot) is cheaper;
    MKL reads x transposed in place. When w is frozen dw is unused and XLA drops it."""
    x_TI, w_IO = res
    x_NI, g_NO = x_TI.reshape(-1, x_TI.shape[-1]), g_TO.reshape(-1, g_TO.shape[-1])
    if w_IO.ndim == 2 and mkl_gemm.applies(x_TI, w_IO, g_TO):
        dx_NI = mkl_gemm.gemm(g_NO, w_IO, transpose_b=True)
        return dx_NI.reshape(x_TI.shape), mkl_gemm.gemm(x_NI, g_NO, transpose_a=True)
    x_IN = jax.lax.optimization_barrier(x_NI.T)
    return dot(g_TO, w_IO.T), dot(x_IN, g_NO)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class RMSNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        rngs: nnx.Rngs,
        num_layers: int | None = None,
        param_dtype=jnp.float32,
    ):
        shape, axes = stacked(num_layers, (dim,), ("norm",))
        self.scale = param(rngs, nnx.initializers.ones, shape, axes, param_dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_TD, scale_D, eps: float):
    """x / rms(x) * scale over the last dim, computed in fp32 whatever x's dtype (bf16
    variance underflows); the result has x's dtype."""
    return _rms_norm_fwd(x_TD, scale_D, eps)[0]


def _rms_norm_fwd(x_TD, scale_D, eps):
    if rms_norm_kernel.applies(x_TD, scale_D):  # one C++ pass
        y, r_T1 = rms_norm_kernel.forward(x_TD, scale_D, eps)
        return y, (x_TD, r_T1, scale_D)
    x32 = x_TD.astype(jnp.float32)
    r_T1 = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = (x32 * r_T1 * scale_D.astype(jnp.float32)).astype(x_TD.dtype)
    return y, (x_TD, r_T1, scale_D)


def _rms_norm_bwd(eps, res, dy_TD):
    """Saves x and 1/rms only (autodiff also keeps x / rms and its scaled copy, two
    more activations per norm written every step and read back here)."""
    del eps
    x_TD, r_T1, scale_D = res
    if rms_norm_kernel.applies(x_TD, scale_D, dy_TD):  # one C++ pass
        return rms_norm_kernel.backward(x_TD, r_T1, scale_D, dy_TD)
    n32 = x_TD.astype(jnp.float32) * r_T1
    dy32 = dy_TD.astype(jnp.float32)
    dscale = jnp.sum(dy32 * n32, axis=tuple(range(dy32.ndim - 1)))
    dn32 = dy32 * scale_D.astype(jnp.float32)
    dx32 = r_T1 * (dn32 - n32 * jnp.mean(dn32 * n32, axis=-1, keepdims=True))
    return dx32.astype(x_TD.dtype), dscale.astype(scale_D.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate_TF, up_TF):
    """silu(gate) * up (Llama's MLP), in the inputs' dtype."""
    return jax.nn.silu(gate_TF) * up_TF


def _swiglu_fwd(gate_TF, up_TF):
    return swiglu(gate_TF, up_TF), (gate_TF, up_TF)


def _swiglu_bwd(res, dh_TF):
    """Saves gate and up only and recomputes the sigmoid: autodiff keeps sigmoid(gate),
    silu(gate) and more, each a [tokens, intermediate] activation, the widest of the
    layer (six in all on llama-1b's GPU profile, against these two)."""
    gate_TF, up_TF = res
    if swiglu_backward.applies(gate_TF, up_TF, dh_TF):  # one C++ pass
        return swiglu_backward.backward(gate_TF, up_TF, dh_TF)
    g32, u32, dh32 = (a.astype(jnp.float32) for a in (gate_TF, up_TF, dh_TF))
    sig = jax.nn.sigmoid(g32)
    dgate = dh32 * u32 * sig * (1.0 + g32 * (1.0 - sig))
    dup = dh32 * g32 * sig
    return dgate.astype(gate_TF.dtype), dup.astype(up_TF.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Embed(nnx.Module):
    def __init__(
        self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32
    ):
        self.embedding = param(rngs, DEFAULT_INIT, (vocab, dim), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, ids_BT):
        return jnp.take(self.embedding[...], ids_BT, axis=0).astype(self.dtype)

    def attend(self, h_BTD):
        """Tied output projection: logits over the vocabulary."""
        return dot(h_BTD.astype(self.dtype), self.embedding[...].T.astype(self.dtype))


def rope_tables(positions_BT, head_dim: int, theta: float):
    """cos/sin of HF's rotate-half RoPE, each [B, T, head_dim]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTH = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """x rotated by RoPE's tables: one C++ pass where ftlib's CPU kernels run
    (rope_kernel), XLA's ops elsewhere."""
    if rope_kernel.applies(x_BTNH, cos_BTH, sin_BTH):
        return _rope_in_kernel(x_BTNH, cos_BTH, sin_BTH)
    return _rope_xla(x_BTNH, cos_BTH, sin_BTH)


def _rope_xla(x_BTNH, cos_BTH, sin_BTH):
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x_BTNH * cos + rotated * sin).astype(x_BTNH.dtype)


@jax.custom_vjp
def _rope_in_kernel(x_BTNH, cos_BTH, sin_BTH):
    return rope_kernel.rotate(x_BTNH, cos_BTH, sin_BTH, inverse=False)


def _rope_in_kernel_fwd(x, cos, sin):
    # Symbolic zeros say whether the tables are differentiated (never from integer
    # positions): only then is x saved, for their gradients through XLA's ops.
    y = rope_kernel.rotate(x.value, cos.value, sin.value, inverse=False)
    tables_pullback = None
    if cos.perturbed or sin.perturbed:
        tables_pullback = jax.vjp(lambda c, s: _rope_xla(x.value, c, s), cos.value, sin.value)[1]
    return y, (cos.value, sin.value, tables_pullback)


def _rope_in_kernel_bwd(res, dy):
    cos, sin, tables_pullback = res
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(dy.shape, dy.dtype)
    dx = rope_kernel.rotate(dy, cos, sin, inverse=True)
    return (dx, *(tables_pullback(dy) if tables_pullback else (None, None)))


_rope_in_kernel.defvjp(_rope_in_kernel_fwd, _rope_in_kernel_bwd, symbolic_zeros=True)
