"""One layer of a stacked [L, ...] array, not sliced out of it.

The layer loop and scan (ftlib.models.layer_stack) hand each layer its params. A slice
of a stack is a copy on XLA:CPU wherever a custom call reads it, and the step's products
are custom calls (ftlib.mkl_gemm): every step copied each frozen weight out of its stack,
forward and backward. A LayerView of a frozen weight lets the MKL product read it in
place (mkl_gemm's `_layer` targets); anything else that reads it through `view[...]`
(or a Variable holding it: `kernel[...]`) gets the slice, as before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    stack: jax.Array  # [L, *shape]
    index: jax.Array  # int32 scalar: the layer

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self):
        return self.stack.dtype

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    def get(self) -> jax.Array:
        """The layer, sliced out of the stack."""
        return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)

    def __getitem__(self, key):
        return self.get()[key]

    def astype(self, dtype):
        """Itself where dtype is its own (no copy), else the cast slice."""
        return self if jnp.dtype(dtype) == self.dtype else self.get().astype(dtype)

    def cotangent(self, d_layer) -> LayerView:
        """The view's cotangent for the layer's gradient d_layer: d_layer at the layer
        of a zero stack. Views hold params nothing differentiates (layer_stack makes
        them for those only), so XLA drops it."""
        d_stack = jax.lax.dynamic_update_index_in_dim(
            jnp.zeros_like(self.stack), d_layer.astype(self.dtype), self.index, 0
        )
        return LayerView(d_stack, np.zeros((), jax.dtypes.float0))


def unwrapped(x):
    """x's stack where x is a LayerView (what dtype and device checks read), else x."""
    return x.stack if isinstance(x, LayerView) else x


def cotangent_like(param, grad):
    """grad as the cotangent of param: a LayerView's for a view."""
    return param.cotangent(grad) if isinstance(param, LayerView) else grad
