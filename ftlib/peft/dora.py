"""DoRA (Liu et al. 2024): y = m * (x V) / ||V||_col with V = W + scale A^T B.

The LoRA factors steer the direction of each output feature's weight column and
the trainable magnitude m (init: the column norms of W, so the layer starts as
the base layer) sets its length. As in HF PEFT and the paper (section 4.3), the
norm ||V||_col is a constant in the backward pass: gradients reach A and B only
through V itself, which saves memory and barely changes accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ftlib.models.layers import Linear, dot
from ftlib.peft import lora
from ftlib.peft.surgery import replace_modules


def column_norm(kernel):
    """||kernel||_2 over the input dim: one norm per output feature, [*layers, out], fp32."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=-2))


class DoRALinear(lora.LoRALinear):
    def __init__(
        self, base: Linear, rank: int, alpha: float, dropout: float, rslora: bool, *, rngs: nnx.Rngs
    ):
        super().__init__(base, rank, alpha, dropout, rslora, rngs=rngs)
        kernel = base.kernel
        *lead_axes, _, out_axis = kernel.get_metadata()["logical_axes"]
        self.lora_magnitude = nnx.Param(
            column_norm(kernel[...]).astype(kernel.dtype), logical_axes=(*lead_axes, out_axis)
        )

    def _magnitude_scale(self):
        """m / ||W + scale A^T B||_col, the norm detached (PEFT's `weight_norm.detach()`)."""
        norm = jax.lax.stop_gradient(column_norm(self._direction()))
        return self.lora_magnitude[...].astype(jnp.float32) / norm

    def _direction(self):
        """V = W + scale A^T B, [*layers, in, out]."""
        return self.base.kernel[...] + self.delta_kernel()

    def __call__(self, x, rng=None):
        y = self.base(x)
        x_drop = lora.dropout(x, self.dropout, rng)
        dt = self.base.dtype
        if x_drop is x:  # no dropout: reuse the base output (minus its bias) as x W
            xw = y if self.base.bias is None else y - self.base.bias[...].astype(dt)
        else:  # PEFT: with dropout the rescaled base term sees the dropped-out input too
            xw = dot(x_drop.astype(dt), self.base.kernel[...].astype(dt))
        mag = self._magnitude_scale().astype(dt)
        return y + (mag - 1) * xw + mag * self.lora_path(x_drop)

    def merged_kernel(self):
        return self._magnitude_scale()[..., None, :].astype(self.base.kernel.dtype) * (
            self._direction()
        )

    def unmerged(self, kernel, bias):
        # PEFT divides by the merge-time magnitude scale; it is unchanged while the
        # adapter is held here, so recomputing it equals PEFT's cached weight_norm.
        scale = self._magnitude_scale()[..., None, :].astype(kernel.dtype)
        return kernel / scale - self.delta_kernel(), bias


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.dora
    replace_modules(
        model,
        c.target_modules,
        Linear,
        lambda base: DoRALinear(base, c.rank, c.alpha, c.dropout, c.rslora, rngs=rngs),
    )


OPTIONS = lora.OPTIONS

TRAINABLE_RULES = ((r".*/lora_(a|b|magnitude)$", True), (r".*", False))
