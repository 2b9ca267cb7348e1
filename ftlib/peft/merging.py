"""Merging adapters into plain Linear layers, and taking them out again.

A mergeable wrapper (LoRA, DoRA, IA3) holds its base Linear under `base` and
exposes `merged_kernel()` ([*layers, in, out], the kernel of an equivalent plain
Linear), `merged_bias()` (None for a bias-free base) and `unmerged(kernel, bias)`,
the inverse that recovers the base kernel and bias from merged ones.
"""

from __future__ import annotations

from flax import nnx

from ftlib.peft.surgery import set_module


def is_mergeable(module) -> bool:
    return hasattr(module, "merged_kernel")


def merge(model: nnx.Module) -> dict[tuple, nnx.Module]:
    """Replaces every mergeable wrapper in `model` by a plain Linear (a copy of its
    base) with the merged kernel and bias, for export or adapter-free inference.
    Returns the removed wrappers by module path, for `unmerge`. Wrappers that
    cannot merge (bottleneck adapters) stay."""
    wrappers = {path: m for path, m in nnx.iter_modules(model) if path and is_mergeable(m)}
    for path, wrapper in wrappers.items():
        linear = nnx.clone(wrapper.base)
        linear.kernel.set_value(wrapper.merged_kernel())
        if linear.bias is not None:
            linear.bias.set_value(wrapper.merged_bias())
        set_module(model, path, linear)
    return wrappers


def unmerge(model: nnx.Module, wrappers: dict[tuple, nnx.Module]) -> None:
    """Puts the wrappers returned by `merge` back, their base kernel and bias
    recomputed from the merged Linear now at each path (as HF PEFT's unmerge
    does: merged weights minus the adapter's contribution)."""
    for path, wrapper in wrappers.items():
        linear = model
        for part in path:
            linear = getattr(linear, part)
        bias = None if linear.bias is None else linear.bias[...]
        kernel, bias = wrapper.unmerged(linear.kernel[...], bias)
        wrapper.base.kernel.set_value(kernel)
        if bias is not None:
            wrapper.base.bias.set_value(bias)
        set_module(model, path, wrapper)
