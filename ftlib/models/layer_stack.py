"""A stack of layers over stacked [L, ...] params: `lax.scan` or a Python loop, for
every model with stacked layers (Llama, BERT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def run(body, h, xs, num_layers: int, *, scan: bool, unroll: int = 1):
    """body(h, layer) -> (h, y) over the layers of xs (stacked [L, ...] leaves; None
    leaves stay None) -> (h, ys stacked over layers): lax.scan, or a Python loop over
    layer_slices.

    The scan's one body also computes layer 0's input gradient, dead code where nothing
    below the layers trains (LoRA and most PEFT methods). Running layer 0 apart lets XLA
    drop it, but scanning the rest then needs xs[1:], a copy of the frozen weights every
    step: 157 ms for the 411 MB that xs[1:] copies of the default run's SmolLM2, against
    ~8 ms of products saved
    (benchmarks/README.md). Not done."""
    if scan:
        return jax.lax.scan(body, h, xs, unroll=unroll)
    ys = []
    for layer in layer_slices(xs, num_layers):
        h, y = body(h, layer)
        ys.append(y)
    return h, jax.tree.map(lambda *y: jnp.stack(y), *ys) if ys else None
