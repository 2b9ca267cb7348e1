"""A stack of layers over stacked [L, ...] params: `lax.scan` or a Python loop, for
every model with stacked layers (Llama, BERT); under the scan, layer 0's input gradient
is skipped where nothing below the layers trains, and frozen weights that MKL's products
read reach the layers as LayerViews, not copies (`run`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from ftlib import mkl_gemm
from ftlib.layer_view import LayerView

# Deepest stack the layer loop runs by default on a CPU: its compile time grows with depth.
LOOP_MAX_LAYERS_CPU = 16

_FORWARD_ONLY = contextvars.ContextVar("ftlib_forward_only", default=False)


@contextlib.contextmanager
def forward_only():
    """Tracing under it: nothing differentiates the layer stacks traced (an eval step,
    generation), which autodiff's probe cannot tell from "not known", so their frozen
    weights go as LayerViews too (`viewed`). Differentiating them anyway stays correct,
    at the cost of a stack-sized cotangent per layer."""
    token = _FORWARD_ONLY.set(True)
    try:
        yield
    finally:
        _FORWARD_ONLY.reset(token)


def scans_layers(scan_layers: bool | None, num_layers: int) -> bool:
    """model.scan_layers -> whether the blocks run under `lax.scan` (True) or as a
    Python loop over the stacked params (False). None picks by backend and depth:

    - GPU: the loop. XLA copies each layer's params and saved activations out of and
      into the stacked buffers around a scan (llama-1b bf16 on an H200: loop steps take
      0.87x (full) and 0.82x (LoRA) the time, compiling in 11 s instead of 7).
    - CPU: the loop up to LOOP_MAX_LAYERS_CPU layers, the scan deeper. The loop saves
      the scan's stacking (paired steps: llama-tiny 0.84-0.87x, llama-small 0.91-0.92x,
      32 layers 0.92x) but compiles once per batch shape in time growing with depth
      (LoRA, hidden 256: 1.4 / 3.6 / 7.5 s at 4 / 16 / 32 layers, the scan 1.6 s at
      each): the default run's 30-layer SmolLM2 took 275 s with the loop against 252
      with the scan, at 0.96x the step time (benchmarks/README.md).
    - Elsewhere (TPU): the scan.
    """
    if scan_layers is not None:
        return bool(scan_layers)
    backend = jax.default_backend()
    if backend == "gpu":
        return False
    return not (backend == "cpu" and num_layers <= LOOP_MAX_LAYERS_CPU)


def layer_slices(tree, L: int) -> list:
    """The L per-layer trees of a tree of stacked [L, ...] arrays (None leaves stay None),
    for the layer loop. lax.split, not x[i]: its transpose concatenates the layers'
    gradients into the stacked one, where indexing's is one zero-padded [L, ...] array per
    layer, summed (llama-tiny's loop step on the CPU: 144 pad fusions, none with split)."""
    arrays, treedef = jax.tree.flatten(tree)
    split = [jax.lax.split(x, (1,) * L) for x in arrays]
    return [treedef.unflatten([parts[i][0] for parts in split]) for i in range(L)]


def run(body, h, xs, num_layers: int, *, scan: bool, unroll: int = 1, views: bool = False):
    """body(h, layer) -> (h, y) over the layers of xs (stacked [L, ...] leaves; None
    leaves stay None) -> (h, ys stacked over layers): lax.scan, or a Python loop over
    layer_slices.

    The scan's one body also computes layer 0's input gradient, dead code where nothing
    below the layers trains (LoRA and most PEFT methods: the embeddings are frozen).
    There, each layer's backward runs under a `lax.cond` on "is this layer 0", whose
    layer-0 branch leaves out the input gradient, so XLA drops its products there
    (`_input_grad_skipped_at_first`). (Running layer 0 outside the scan instead needs
    xs[1:], a copy of every frozen weight each step: 157 ms for the 411 MB of the default
    run's SmolLM2, against ~8 ms saved.) Paired llama-small LoRA steps on the CPU: 1.022
    to 1.048 for the old path; llama-tiny's neutral (benchmarks/README.md).

    views=True: a frozen weight that MKL's products read (`viewed`) reaches its layer as
    a LayerView of its stack, for bodies that read their params as Variables (`[...]`
    slices a view) or hand them to ftlib.models.products: the scan's slice or the
    loop's split would be a copy of it, forward and backward, every step. Paired LoRA
    steps of SmolLM2-135M's shape under the scan: 1.047 for the copies; llama-small's
    loop 1.004; greedy decoding with the KV cache 1.6-1.9x faster (benchmarks/README.md)."""
    views = viewed(h, xs) if views else [False] * len(jax.tree.leaves(xs))
    layer_of = _layer_with_views(xs, views)
    if scan:
        if any(views):  # the viewed stacks are not sliced; the body gets the layer index
            leaves = jax.tree.leaves(xs)
            scanned = [None if v else x for x, v in zip(leaves, views)]
            xs = (scanned, jnp.arange(num_layers, dtype=jnp.int32))
        if num_layers > 1 and input_differentiated(h, xs) is False:
            first = jnp.arange(num_layers) == 0
            step = lambda h, layer: _input_grad_skipped_at_first(  # noqa: E731
                body, h, layer_of(layer[0]), layer[1]
            )
            return jax.lax.scan(step, h, (xs, first), unroll=unroll)
        return jax.lax.scan(lambda h, layer: body(h, layer_of(layer)), h, xs, unroll=unroll)
    ys = []
    for i, layer in enumerate(layer_slices(xs, num_layers)):
        if any(views):  # the split's parts these replace are dead code, which XLA drops
            layer = layer_of((jax.tree.leaves(layer), jnp.asarray(i, jnp.int32)))
        h, y = body(h, layer)
        ys.append(y)
    return h, jax.tree.map(lambda *y: jnp.stack(y), *ys) if ys else None


def viewed(h, xs) -> list[bool]:
    """Per leaf of xs: whether its layers go as LayerViews. Stacks of matrices (ndim 3)
    that autodiff, tracing now, does not differentiate (all of them under
    `forward_only`), where MKL runs their products (which read views in place:
    ftlib.mkl_gemm). Elsewhere (an accelerator, a sharded step, no autodiff or not
    known) the layers get slices, as everything else does. The probe also takes h and
    the other floating leaves: JAX runs it only where one of its inputs is
    differentiated, which under prompt tuning is h alone, under IA3 or BitFit a vector."""
    leaves = jax.tree.leaves(xs)
    floating = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]
    candidates = [f and jnp.ndim(x) == 3 for x, f in zip(leaves, floating)]
    if not any(candidates) or not mkl_gemm.applies(*(x for x, c in zip(leaves, candidates) if c)):
        return [False] * len(leaves)
    probed = [x for x, f in zip(leaves, floating) if f]
    trained = differentiated_leaves([h, *probed])
    if trained is None and _FORWARD_ONLY.get():
        trained = [False] * (1 + len(probed))
    if trained is None:
        return [False] * len(leaves)
    trained_of = iter(trained[1:])
    differentiated = [next(trained_of) if f else False for f in floating]
    return [c and not d for c, d in zip(candidates, differentiated)]


def _layer_with_views(xs, views):
    """-> layer_of: the layer from (its slices of the leaves of xs, in order, a viewed
    leaf's None or unused; the layer index), each viewed leaf a LayerView of its stack.
    Where nothing is viewed the layer is xs's slice itself, returned as it is."""
    if not any(views):
        return lambda layer: layer
    leaves, treedef = jax.tree.flatten(xs)

    def layer_of(layer):
        parts, index = layer
        return treedef.unflatten(
            [LayerView(x, index) if v else p for x, p, v in zip(leaves, parts, views)]
        )

    return layer_of


def differentiated_leaves(leaves) -> list[bool] | None:
    """Per array of `leaves`: whether reverse-mode autodiff, tracing this call now,
    needs its gradient; None where that is not known here (no autodiff, autodiff of an
    already traced function, as under jax.checkpoint of the whole model, or no leaf
    differentiated at all). Asked through a custom JVP rule with symbolic zeros: JAX
    calls it while it traces, where some leaf is differentiated, with a symbolic zero
    for each tangent of a leaf that depends on nothing differentiated."""
    seen = []

    @jax.custom_jvp
    def probe(*xs):
        return xs[0]

    def rule(primals, tangents):
        seen.append([not isinstance(t, SymbolicZero) for t in tangents])
        return primals[0], tangents[0] if seen[-1][0] else jnp.zeros_like(primals[0])

    probe.defjvp(rule, symbolic_zeros=True)
    probe(*leaves)
    return seen[0] if seen else None


def input_differentiated(x, params) -> bool | None:
    """Whether reverse-mode autodiff, tracing this call now, needs the gradient of x:
    True or False where it differentiates some leaf of `params` (or x); None where that
    is not known here (`differentiated_leaves`)."""
    seen = differentiated_leaves([x, *jax.tree.leaves(params)])
    return None if seen is None else seen[0]


def _is_primal(p) -> bool:
    return isinstance(p, CustomVJPPrimal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _input_grad_skipped_at_first(body, h, layer, first):
    """body(h, layer), whose backward computes no gradient of h where `first`."""
    return body(h, layer)


def _skipping_fwd(body, h, layer, first):
    # With symbolic zeros every input is a CustomVJPPrimal: the pullback is taken w.r.t.
    # the differentiated leaves only, so frozen weights get no gradient products.
    leaves, treedef = jax.tree.flatten(layer, is_leaf=_is_primal)
    values = [p.value for p in leaves]
    trained = [p.perturbed for p in leaves]

    def layer_of(h, trained_values):
        it = iter(trained_values)
        return body(h, treedef.unflatten([next(it) if t else v for v, t in zip(values, trained)]))

    out, pullback = jax.vjp(layer_of, h.value, [v for v, t in zip(values, trained) if t])
    # The layer's structure with an empty array where a leaf trains, None where not.
    ct_layout = treedef.unflatten([jnp.zeros((0,)) if t else None for t in trained])
    return out, (pullback, first.value, ct_layout)


def _skipping_bwd(body, res, g):
    del body
    pullback, first, ct_layout = res
    # An output nothing reads (the per-layer outputs in training) comes as a symbolic zero.
    g = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c,
                     g, is_leaf=lambda c: isinstance(c, SymbolicZero))  # fmt: skip
    # h's gradient has the shape of the layer's output h (a residual stream), so layer
    # 0's branch builds its zeros from that, not from a saved residual.
    skip = lambda g: (jnp.zeros_like(g[0]), pullback(g)[1])  # noqa: E731
    dh, dtrained = jax.lax.cond(first, skip, pullback, g)
    it = iter(dtrained)
    dlayer = jax.tree.map(lambda t: None if t is None else next(it), ct_layout,
                          is_leaf=lambda t: t is None)  # fmt: skip
    return dh, dlayer, None


_input_grad_skipped_at_first.defvjp(_skipping_fwd, _skipping_bwd, symbolic_zeros=True)
