"""ftlib.models.layer_stack: the scan with its first layer apart where autodiff needs no
gradient of the stack's input, against the plain scan and the loop."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftlib.models import layer_stack
from ftlib.models.llama import Llama, LlamaConfig


def _body(h, w):
    """A layer with a per-layer output, like Llama's stacked k/v."""
    h = jnp.tanh(h @ w["kernel"]) + h
    return h, h.sum(-1)


def _stack(L=4, D=6):
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"kernel": jax.random.normal(keys[0], (L, D, D)) / D}
    return params, jax.random.normal(keys[1], (3, D))


def test_input_differentiated_asks_autodiff_while_it_traces():
    params, x = _stack()
    seen = []

    def loss(params, x):
        seen.append(layer_stack.input_differentiated(x * 2, params))
        return jnp.sum(x) + jnp.sum(params["kernel"])

    jax.grad(loss)(params, x)  # params only: x is a constant to autodiff
    jax.grad(loss, argnums=(0, 1))(params, x)
    loss(params, x)  # no autodiff
    jax.grad(lambda p, x: jax.checkpoint(loss)(p, x))(params, x)  # traced before autodiff
    assert seen == [False, True, None, None]


@pytest.mark.parametrize("wrt_input", [False, True])
def test_scan_with_the_first_layer_apart_matches_the_loop(wrt_input):
    params, x = _stack()
    calls = collections.Counter()

    def loss(params, x, scan):
        def body(h, w):
            calls[scan] += 1  # traced bodies: the scan's once, the first layer apart once more
            return _body(h, w)

        h, ys = layer_stack.run(body, x, params, 4, scan=scan)
        return jnp.sum(h**2) + jnp.sum(jnp.sin(ys))

    argnums = (0, 1) if wrt_input else 0
    want = jax.value_and_grad(loss, argnums=argnums)(params, x, False)
    got = jax.value_and_grad(loss, argnums=argnums)(params, x, True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert calls[True] == (1 if wrt_input else 2) and calls[False] == 4


CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8, scan_layers=True,
)  # fmt: skip


def _grads(method: str, scan: bool):
    """Gradients of the trainable params of a tiny Llama under `method`, split by its
    mask as the train step does."""
    from configs import default
    from ftlib import peft

    model = Llama(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    c = default.get_config().peft
    c.method = method
    c.lora.update(dict(rank=4, alpha=8.0))
    c.prompt.num_virtual_tokens = 3
    mask = peft.apply_method(model, c)
    for name, leaf in nnx.iter_graph(model):
        if name and name[-1] == "lora_b":  # non-zero, so that every adapter factor learns
            leaf[...] = jax.random.normal(jax.random.key(len(name)), leaf.shape) * 0.1
    graphdef, params, frozen = nnx.split(model, mask.filter, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, frozen)(ids) ** 2)
    return jax.grad(loss)(params)


@pytest.mark.parametrize("method, input_grad", [("lora", False), ("prompt", True), ("full", True)])
def test_llama_gradients_under_the_scan_match_the_loop(monkeypatch, method, input_grad):
    """LoRA trains nothing below the blocks, so the scan runs layer 0 apart; the soft
    prompt and full fine-tuning train the blocks' input, so one body runs them all.
    Either way the trainable params' gradients equal the layer loop's."""
    asked = []
    ask = layer_stack.input_differentiated
    monkeypatch.setattr(
        layer_stack, "input_differentiated", lambda *a: asked.append(ask(*a)) or asked[-1]
    )
    got = _grads(method, scan=True)
    assert asked == [input_grad]
    want = _grads(method, scan=False)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
