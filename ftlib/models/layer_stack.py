"""A stack of layers over stacked [L, ...] params: `lax.scan`, a Python loop, or the
scan with its first layer apart when autodiff needs no gradient of the stack's input.

Why the first layer apart: a scan runs one body for every layer, so its backward
computes every layer's input gradient, the first one's too. When nothing below the
stack trains (LoRA, prefix tuning, adapters: the embeddings are frozen), that gradient
is dead, but XLA cannot drop it from a loop body. Outside the scan it can: the first
layer's q/k/v and gate/up input-gradient products and its attention norm's backward go
(llama-small LoRA: ~2% of the step's FLOPs; llama-tiny ~4%). Paired against the whole
scan on the CPU: llama-tiny LoRA 1.02-1.03 in CPU seconds, 0.99-1.01 in wall time;
llama-small LoRA within the machine's noise (benchmarks/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def scans_layers(scan_layers: bool | None) -> bool:
    """model.scan_layers -> whether the blocks run under `lax.scan` (True) or as a
    Python loop over the stacked params (False). None picks by backend: a loop on GPU,
    where XLA copies each layer's params and saved activations out of and into the
    stacked buffers around a scan (llama-1b bf16 on an H200: loop steps take 0.87x
    (full) and 0.82x (LoRA) the time, compiling in 11 s instead of 7); scan elsewhere,
    where the loop gains little and compiles much longer (CPU: 3-6x at 16-32 layers)."""
    if scan_layers is None:
        return jax.default_backend() != "gpu"
    return bool(scan_layers)


def layer_slices(tree, L: int) -> list:
    """The L per-layer trees of a tree of stacked [L, ...] arrays (None leaves stay None),
    for the layer loop. lax.split, not x[i]: its transpose concatenates the layers'
    gradients into the stacked one, where indexing's is one zero-padded [L, ...] array per
    layer, summed (llama-tiny's loop step on the CPU: 144 pad fusions, none with split)."""
    arrays, treedef = jax.tree.flatten(tree)
    split = [jax.lax.split(x, (1,) * L) for x in arrays]
    return [treedef.unflatten([parts[i][0] for parts in split]) for i in range(L)]


def input_differentiated(x, params) -> bool | None:
    """Whether reverse-mode autodiff, tracing this call now, needs the gradient of x:
    True or False where it differentiates some leaf of `params`, None where that is not
    known here (no autodiff, or autodiff of an already traced function, as under
    jax.checkpoint or inside a scan body). Asked through a custom JVP rule with symbolic
    zeros, which JAX calls while it traces and which sees x's tangent as a symbolic zero
    when x depends on nothing differentiated."""
    seen = []

    @jax.custom_jvp
    def probe(x, params):
        del params
        return x

    def rule(primals, tangents):
        x_dot = tangents[0]
        seen.append(not isinstance(x_dot, SymbolicZero))
        return primals[0], x_dot if seen[-1] else jnp.zeros_like(primals[0])

    probe.defjvp(rule, symbolic_zeros=True)
    probe(x, params)
    return seen[0] if seen else None


def run(body, h, xs, num_layers: int, *, scan: bool, unroll: int = 1):
    """body(h, layer) -> (h, y) over the layers of xs (stacked [L, ...] leaves; None
    leaves stay None) -> (h, ys stacked over layers). `scan`: lax.scan, with the first
    layer run apart when autodiff needs no gradient of h (the module docstring); else a
    Python loop over layer_slices."""
    if not scan:
        ys = []
        for layer in layer_slices(xs, num_layers):
            h, y = body(h, layer)
            ys.append(y)
        return h, jax.tree.map(lambda *y: jnp.stack(y), *ys)
    if num_layers > 1 and input_differentiated(h, xs) is False:
        # xs[1:] copies the frozen weights once a step (88 MB on llama-small). Indexing
        # the whole arrays inside the body instead made the scan save each layer's slice
        # as a residual: a stacked copy written and read back, twice the traffic.
        h, y0 = body(h, jax.tree.map(lambda x: x[0], xs))
        h, ys = jax.lax.scan(body, h, jax.tree.map(lambda x: x[1:], xs), unroll=unroll)
        return h, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)
    return jax.lax.scan(body, h, xs, unroll=unroll)
