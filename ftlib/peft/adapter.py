"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020 placement).

y = h + up(act(down(h))) on the output h of a sublayer's output projection,
before the residual add: d -> `bottleneck` -> d with biases, `up` zero-initialised
so the model starts as the base model. 'houlsby' places one after attention and
one after the MLP; 'pfeiffer' only after the MLP. Not mergeable (the
nonlinearity sits between the two projections).
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models.layers import Linear, dot, param
from ftlib.peft.surgery import replace_modules

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


class AdapterLinear(nnx.Module):
    def __init__(self, base: Linear, bottleneck: int, activation: str, *, rngs: nnx.Rngs):
        kernel = base.kernel
        *lead, _, d = kernel.shape
        *lead_axes, _, axis = kernel.get_metadata()["logical_axes"]
        dtype = kernel.dtype
        # Down: LoRA A's kaiming-uniform bound; up: zeros, so the adapter adds nothing at init.
        bound = 1.0 / math.sqrt(d)
        init_down = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
        zeros = nnx.initializers.zeros
        self.base = base
        self.adapter_down = param(
            rngs, init_down, (*lead, d, bottleneck), (*lead_axes, axis, "adapter"), dtype
        )
        self.adapter_down_bias = param(
            rngs, zeros, (*lead, bottleneck), (*lead_axes, "adapter"), dtype
        )
        self.adapter_up = param(
            rngs, zeros, (*lead, bottleneck, d), (*lead_axes, "adapter", axis), dtype
        )
        self.adapter_up_bias = param(rngs, zeros, (*lead, d), (*lead_axes, axis), dtype)
        self.activation = activation

    def __call__(self, x, rng=None):
        h = self.base(x, rng=rng)
        dt = self.base.dtype
        z = dot(h, self.adapter_down[...].astype(dt)) + self.adapter_down_bias[...].astype(dt)
        z = ACTIVATIONS[self.activation](z)
        return h + dot(z, self.adapter_up[...].astype(dt)) + self.adapter_up_bias[...].astype(dt)


PLACEMENTS = ("houlsby", "pfeiffer")


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.adapter
    if c.placement not in PLACEMENTS:
        raise FtlibError(
            f"peft.adapter.placement {c.placement!r}: use 'houlsby' (after attention and "
            "MLP) or 'pfeiffer' (after the MLP only)"
        )
    if c.activation not in ACTIVATIONS:
        raise FtlibError(
            f"peft.adapter.activation {c.activation!r}: known {', '.join(sorted(ACTIVATIONS))}"
        )
    targets = [c.mlp_output] if c.placement == "pfeiffer" else [c.attn_output, c.mlp_output]
    for target in targets:
        replace_modules(
            model,
            target,
            Linear,
            lambda base: AdapterLinear(base, c.bottleneck, c.activation, rngs=rngs),
        )


OPTIONS = ("bottleneck", "activation", "placement", "attn_output", "mlp_output")

TRAINABLE_RULES = ((r".*/adapter_(down|up)(_bias)?$", True), (r".*", False))
