"""(IA)^3 (Liu et al. 2022): learned vectors, initialised to ones, rescale
activations. Targets' outputs are scaled per output feature (keys and values by
default); targets that also match `feedforward_modules` get their input scaled
instead (the FFN intermediate, i.e. the input of down_proj), as in HF PEFT.

A vector scales the base layer's whole output, bias included, so merging folds
it into both kernel and bias.
"""

from __future__ import annotations

import re

from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models.layers import Linear, param
from ftlib.peft.surgery import module_path, replace_modules


class IA3Linear(nnx.Module):
    def __init__(self, base: Linear, scale_input: bool, *, rngs: nnx.Rngs):
        kernel = base.kernel
        *lead, d_in, d_out = kernel.shape
        *lead_axes, in_axis, out_axis = kernel.get_metadata()["logical_axes"]
        dim, axis = (d_in, in_axis) if scale_input else (d_out, out_axis)
        self.base = base
        self.ia3_scale = param(
            rngs, nnx.initializers.ones, (*lead, dim), (*lead_axes, axis), kernel.dtype
        )
        self.scale_input = scale_input

    def __call__(self, x, rng=None):
        s = self.ia3_scale[...].astype(self.base.dtype)
        if self.scale_input:
            return self.base(x.astype(self.base.dtype) * s, rng=rng)
        return self.base(x, rng=rng) * s

    def _kernel_scale(self):
        """The vector broadcast against the [*layers, in, out] kernel."""
        s = self.ia3_scale[...]
        return s[..., :, None] if self.scale_input else s[..., None, :]

    def merged_kernel(self):
        return self.base.kernel[...] * self._kernel_scale()

    def merged_bias(self):
        if self.base.bias is None:
            return None
        b = self.base.bias[...]
        return b if self.scale_input else b * self.ia3_scale[...]

    def unmerged(self, kernel, bias):
        """Inverse of (merged_kernel, merged_bias); exact while no scale is zero."""
        kernel = kernel / self._kernel_scale()
        if bias is None or self.scale_input:
            return kernel, bias
        return kernel, bias / self.ia3_scale[...]


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.ia3
    target, feedforward = re.compile(c.target_modules), re.compile(c.feedforward_modules)
    linears = [
        (module_path(p), m) for p, m in nnx.iter_modules(model) if p and isinstance(m, Linear)
    ]
    untargeted = [p for p, _ in linears if feedforward.fullmatch(p) and not target.fullmatch(p)]
    if untargeted:
        raise FtlibError(
            f"peft.ia3.feedforward_modules must be a subset of peft.ia3.target_modules; "
            f"{untargeted[0]} matches only feedforward_modules"
        )
    ff_ids = {id(m) for p, m in linears if feedforward.fullmatch(p)}
    replace_modules(
        model, c.target_modules, Linear, lambda b: IA3Linear(b, id(b) in ff_ids, rngs=rngs)
    )


OPTIONS = ("target_modules", "feedforward_modules")

TRAINABLE_RULES = ((r".*/ia3_scale$", True), (r".*", False))
