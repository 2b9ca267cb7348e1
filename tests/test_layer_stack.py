"""ftlib.models.layer_stack: the layer scan against the Python loop, values and
gradients, alone and in a tiny Llama under PEFT, with layer 0's input gradient skipped
where nothing below the layers trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftlib import mkl_gemm
from ftlib.models import layer_stack
from ftlib.models.llama import Llama, LlamaConfig


def test_input_differentiated_asks_autodiff_while_it_traces():
    kernel, x = jnp.ones((4, 6, 6)), jnp.ones((3, 6))
    seen = []

    def loss(kernel, x):
        seen.append(layer_stack.input_differentiated(x * 2, {"kernel": kernel}))
        return jnp.sum(x) + jnp.sum(kernel)

    jax.grad(loss)(kernel, x)  # the kernel only: x is a constant to autodiff
    jax.grad(loss, argnums=(0, 1))(kernel, x)
    loss(kernel, x)  # no autodiff
    jax.grad(lambda k, x: jax.checkpoint(loss)(k, x))(kernel, x)  # traced before autodiff
    assert seen == [False, True, None, None]


@pytest.mark.parametrize("wrt_input", [False, True])
def test_scan_matches_the_loop_with_per_layer_outputs(wrt_input):
    """Values and gradients, with a frozen leaf; without the input's gradient the scan's
    backward skips it for layer 0 (a cond in the compiled step)."""
    L, D = 4, 6
    keys = jax.random.split(jax.random.key(0), 3)
    frozen = jax.random.normal(keys[2], (L, D, D)) / D
    params = {"kernel": jax.random.normal(keys[0], (L, D, D)) / D, "unused": None}
    x = jax.random.normal(keys[1], (3, D))

    def body(h, w):  # a per-layer output, like Llama's stacked k/v
        h = jnp.tanh(h @ w["kernel"] + h @ w["frozen"]) + h
        return h, h.sum(-1)

    def loss(params, x, scan):
        h, ys = layer_stack.run(body, x, dict(params, frozen=frozen), L, scan=scan)
        assert ys.shape == (L, 3)
        return jnp.sum(h**2) + jnp.sum(jnp.sin(ys))

    grad = jax.value_and_grad(loss, argnums=(0, 1) if wrt_input else 0)
    for a, b in zip(
        jax.tree.leaves(grad(params, x, True)), jax.tree.leaves(grad(params, x, False))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hlo = jax.jit(grad, static_argnums=2).lower(params, x, True).as_text()
    assert ("stablehlo.case" in hlo or "stablehlo.if" in hlo) == (not wrt_input)


CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip


def _grads(method: str, scan: bool, remat: str = "none"):
    """Gradients of the trainable params of a tiny Llama under `method`, split by its
    mask as the train step does."""
    grad, params = _grad_fn(method, scan, remat)
    return grad(params)


def _grad_fn(method: str, scan: bool, remat: str = "none"):
    """(jax.grad of a tiny Llama's loss under `method`, its trainable params)."""
    from configs import default
    from ftlib import peft

    model = Llama(dataclasses.replace(CFG, scan_layers=scan, remat=remat), rngs=nnx.Rngs(0))
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
    return jax.grad(loss), params


@pytest.mark.parametrize(
    "method, input_grad, remat",
    [
        ("lora", False, "none"),
        ("lora", False, "full"),
        ("prompt", True, "none"),
        ("full", True, "none"),
    ],
)
def test_llama_gradients_under_the_scan_match_the_loop(monkeypatch, method, input_grad, remat):
    """LoRA trains nothing below the layers: the scan's backward skips layer 0's input
    gradient. The soft prompt and full fine-tuning train the layers' input: it stays.
    Either way the trainable params' gradients equal the layer loop's."""
    asked = []
    ask = layer_stack.input_differentiated
    monkeypatch.setattr(
        layer_stack, "input_differentiated", lambda *a: asked.append(ask(*a)) or asked[-1]
    )
    got = _grads(method, scan=True, remat=remat)
    assert asked == [input_grad]
    want = _grads(method, scan=False, remat=remat)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, scan", [("lora", False), ("lora", True), ("prompt", True)])
def test_frozen_weights_are_read_in_place(monkeypatch, method, scan):
    """Under LoRA (and prompt tuning, where only the layers' input trains) the frozen
    projections reach MKL's products as LayerViews of their stacks (no per-layer
    copies), with the gradients of sliced weights."""
    if not mkl_gemm.applies(jnp.ones((2, 2))):
        pytest.skip("MKL's products do not run here")
    grad, params = _grad_fn(method, scan)
    hlo = jax.jit(grad).lower(params).as_text()
    got = grad(params)
    monkeypatch.setattr(layer_stack, "viewed", lambda h, xs: [False] * len(jax.tree.leaves(xs)))
    grad, params = _grad_fn(method, scan)
    assert "ftlib_sgemm_layer" in hlo
    assert "ftlib_sgemm_layer" not in jax.jit(grad).lower(params).as_text()
    want = grad(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
