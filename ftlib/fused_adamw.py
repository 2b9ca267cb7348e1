"""AdamW's update of one parameter as one C++ pass (CPU): adamw_kernel.cc.

XLA:CPU runs optax's clip + adamw + apply_updates as about 13 passes over
parameter-sized arrays (both moments, the parameter reading them back, g^2 written out
for the gradient norm and reduced); the kernel reads p, g, m, v once and writes p, m, v
in place, summing g^2 on the way. With clipping the norm has to come first:
`sum_squares` reads each gradient once for it. ftlib.optim.apply_gradients calls them
leaf by leaf on optax's own state, so checkpoints and the non-fused path see the same
pytrees. It runs where ftlib's CPU kernels do (ftlib.ffi_kernels: fp32, one CPU
device, the `FTLIB_CPU_GEMM` switch).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftlib import ffi_kernels

SOURCE = pathlib.Path(__file__).parent / "adamw_kernel.cc"
KERNEL = ffi_kernels.Kernel(
    SOURCE,
    {"ftlib_adamw": "FtlibAdamW", "ftlib_sum_squares": "FtlibSumSquares"},
    "AdamW stays in XLA",
)


def applies(*trees) -> bool:
    """Whether the kernel can update these trees' leaves: all float32, one CPU device."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree)]
    return bool(leaves) and KERNEL.applies(*leaves)


def update(p, g, m, v, scalars, *, b1: float, b2: float, eps: float, weight_decay: float):
    """One AdamW step of one parameter -> (p', m', v', sum of g^2 before clipping).

    scalars: float32 [6] = (-lr, 1 / (1 - b1^t), 1 / (1 - b2^t), global gradient norm,
    its reciprocal, clip norm); a clip norm of 0 turns clipping off. The arithmetic is
    optax's (clip_by_global_norm, scale_by_adam, add_decayed_weights,
    scale_by_learning_rate, apply_updates) operation for operation as XLA:CPU compiles
    it, except for the multiply-adds XLA fuses: the two agree to a few ulps. p, m and v
    are updated in place when their buffers are donated."""
    out = (
        jax.ShapeDtypeStruct(p.shape, jnp.float32),
        jax.ShapeDtypeStruct(m.shape, jnp.float32),
        jax.ShapeDtypeStruct(v.shape, jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    return KERNEL.call(
        "ftlib_adamw",
        out,
        p,
        g,
        m,
        v,
        scalars,
        input_output_aliases={0: 0, 2: 1, 3: 2},
        one_minus_b1=np.float32(1 - b1),
        b1=np.float32(b1),
        one_minus_b2=np.float32(1 - b2),
        b2=np.float32(b2),
        eps=np.float32(eps),
        weight_decay=np.float32(weight_decay),
    )


def sum_squares(g):
    """-> the sum of g^2 as a float32 scalar, in one read of g."""
    return KERNEL.call("ftlib_sum_squares", jax.ShapeDtypeStruct((), jnp.float32), g)
