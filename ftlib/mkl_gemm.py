"""fp32 products on CPU through MKL: XLA FFI custom calls built from mkl_gemm.cc.

On a 2-vCPU Xeon the train step's fp32 products (projections and their gradients, the
fused LM head, the causal attention's batched products, LoRA's) run 1.1-2.7x faster in
sequential MKL, one output slice (or batch share) per thread of XLA's pool, than in
XLA's own kernels; llama-tiny full steps take 0.80x the time (benchmarks/README.md).
The models call `applies` at trace time and keep XLA's products wherever it says no.

The kernel is built on first use (ftlib.ffi_kernels: the compiler, the cache, the
`FTLIB_CPU_GEMM` switch). MKL comes from the `mkl` wheel (an x86-64 Linux dependency
of ftlib), loaded privately in its sequential layer.
"""

from __future__ import annotations

import importlib.metadata
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftlib import ffi_kernels
from ftlib.ffi_kernels import Unavailable
from ftlib.layer_view import LayerView, unwrapped

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
TARGETS = {
    "ftlib_sgemm": "FtlibSgemm",
    "ftlib_sgemm_acc": "FtlibSgemmAcc",
    "ftlib_sgemm_layer": "FtlibSgemmLayer",
    "ftlib_sgemm_acc_layer": "FtlibSgemmAccLayer",
}
MAX_DIM = 2**31 - 1  # MKL's LP64 interface takes int sizes


def _mkl_rt() -> pathlib.Path:
    try:
        files = importlib.metadata.distribution("mkl").files or []
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable("the `mkl` package is not installed (pip install mkl)") from None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            return pathlib.Path(f.locate()).resolve()
    raise Unavailable("the `mkl` package has no libmkl_rt.so")


def init_mkl(library) -> None:
    """Loads MKL into a kernel library that includes mkl_sgemm.h (its FtlibMklInit)."""
    mkl_rt = _mkl_rt()
    if library.FtlibMklInit(str(mkl_rt).encode()) != 0:
        raise Unavailable(f"could not load MKL from {mkl_rt}")


KERNEL = ffi_kernels.Kernel(SOURCE, TARGETS, "fp32 CPU products stay in XLA", init_mkl)


def applies(*operands) -> bool:
    """Whether products of these operands go to MKL: float32 operands on a one-device
    CPU backend (a custom call has no sharding rule, so sharded steps keep XLA's), the
    kernel available and FTLIB_CPU_GEMM not `xla`."""
    # Leading dims are merged into the rows, and rows are a leading dimension too.
    if any(max(math.prod(jnp.shape(x)[:-1]), *jnp.shape(x)[-1:]) > MAX_DIM for x in operands):
        return False
    return KERNEL.applies(*map(unwrapped, operands))


def _sizes(a, b, transpose_a, transpose_b):
    if a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or b.ndim != a.ndim:
        raise ValueError(
            f"gemm: operands [*batch, rows, cols] with one batch, got {a.shape}, {b.shape}"
        )
    m, k = a.shape[-1:-3:-1] if transpose_a else a.shape[-2:]
    n, kb = b.shape[-2:] if transpose_b else b.shape[-1:-3:-1]
    if k != kb:
        raise ValueError(f"gemm: contracting sizes differ: {a.shape}, {b.shape}")
    return a.shape[:-2], m, n, k


def _call(target, out_shape, operands, transpose_a, transpose_b, batch, m, n, k, **kw):
    *operands, b = operands
    if isinstance(b, LayerView):  # read in place: the `_layer` target, then the layer
        target, operands = f"{target}_layer", (*operands, b.stack, b.index.astype(jnp.int32))
    else:
        operands = (*operands, b)
    return KERNEL.call(
        target,
        jax.ShapeDtypeStruct(out_shape, jnp.float32),
        *operands,
        transpose_a=bool(transpose_a),
        transpose_b=bool(transpose_b),
        batch=np.int64(np.prod(batch, dtype=np.int64)),
        m=np.int64(m),
        n=np.int64(n),
        k=np.int64(k),
        **kw,
    )


def gemm(a, b, *, transpose_a=False, transpose_b=False):
    """op(a) @ op(b) in float32 over the last two dims, op transposing when asked: a is
    [*batch, M, K] (or [*batch, K, M]), b [*batch, K, N] (or [*batch, N, K]). A
    transposed operand is read in place, never copied. Not differentiable: callers
    give it a custom VJP (layers.matmul) or call it from one (the attention's). b may
    be a LayerView (one [K, N] layer of a stack, no batch), read in place."""
    a = a.get() if isinstance(a, LayerView) else a
    batch, m, n, k = _sizes(a, b, transpose_a, transpose_b)
    if 0 in (m, n, k, *batch):  # MKL wants leading dimensions >= 1
        return jnp.zeros((*batch, m, n), jnp.float32)
    return _call("ftlib_sgemm", (*batch, m, n), (a, b), transpose_a, transpose_b, batch, m, n, k)


def gemm_accumulate(c, a, b, *, transpose_a=False, transpose_b=False):
    """c + op(a) @ op(b), written into c's buffer (MKL's beta = 1): no separate add
    pass over c, e.g. the LM head's [D, V] weight gradient summed over blocks. c None:
    op(a) @ op(b), the first term of a sum."""
    if c is None:
        return gemm(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    a = a.get() if isinstance(a, LayerView) else a
    batch, m, n, k = _sizes(a, b, transpose_a, transpose_b)
    if c.shape != (*batch, m, n):
        raise ValueError(f"gemm_accumulate: c is {c.shape}, the product {(*batch, m, n)}")
    if 0 in (m, n, k, *batch):
        return c
    operands = (c, a, b)
    return _call(
        "ftlib_sgemm_acc",
        c.shape,
        operands,
        transpose_a,
        transpose_b,
        batch,
        m,
        n,
        k,
        input_output_aliases={0: 0},
    )


def einsum_transposes(spec: str) -> tuple[bool, bool] | None:
    """(transpose_a, transpose_b) when einsum `spec` is a batched matmul `gemm` runs:
    both operands and the result share their leading (batch) letters in order, and the
    last two are [rows, contracted] x [contracted, cols] -> [rows, cols] up to each
    operand's transpose ("bkrh,bksh->bkrs": (False, True)); else None."""
    if "..." in spec or "->" not in spec:
        return None
    inputs, out = spec.replace(" ", "").split("->")
    if inputs.count(",") != 1:
        return None
    a, b = inputs.split(",")
    if min(len(a), len(b), len(out)) < 2 or not (len(a) == len(b) == len(out)):
        return None
    if not a[:-2] == b[:-2] == out[:-2] or len(set(a + b + out)) != len(a) + 1:
        return None
    rows, cols = out[-2:]
    contracted = (set(a[-2:]) & set(b[-2:])) - {rows, cols}
    if len(contracted) != 1 or set(a[-2:]) != {rows, *contracted}:
        return None
    if set(b[-2:]) != {cols, *contracted}:
        return None
    (c,) = contracted
    return a[-2] == c, b[-1] == c
