"""ftlib.models.layer_stack: the layer scan against the Python loop, values and
gradients, alone and in a tiny Llama under PEFT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftlib.models import layer_stack
from ftlib.models.llama import Llama, LlamaConfig


def test_scan_matches_the_loop_with_per_layer_outputs():
    L, D = 4, 6
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"kernel": jax.random.normal(keys[0], (L, D, D)) / D, "unused": None}
    x = jax.random.normal(keys[1], (3, D))

    def body(h, w):  # a per-layer output, like Llama's stacked k/v
        h = jnp.tanh(h @ w["kernel"]) + h
        return h, h.sum(-1)

    def loss(params, x, scan):
        h, ys = layer_stack.run(body, x, params, L, scan=scan)
        assert ys.shape == (L, 3)
        return jnp.sum(h**2) + jnp.sum(jnp.sin(ys))

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    for a, b in zip(
        jax.tree.leaves(grad(params, x, True)), jax.tree.leaves(grad(params, x, False))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8,
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


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_llama_peft_gradients_under_the_scan_match_the_loop(method):
    got, want = _grads(method, scan=True), _grads(method, scan=False)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
