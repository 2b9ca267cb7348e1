"""ftlib's C++ kernels beside the products against numpy, autodiff and XLA's ops:
softmax_xent.cc (the LM head's per-row softmax cross-entropy), swiglu_backward.cc,
rms_norm_kernel.cc, rope_kernel.cc, masked_softmax.cc and attention_kernel.cc (the causal
attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlib import (
    attention_kernel,
    masked_softmax,
    rms_norm_kernel,
    rope_kernel,
    softmax_xent,
    swiglu_backward,
)
from ftlib.models import attention, layers

pytestmark = pytest.mark.skipif(
    not softmax_xent.applies(jnp.zeros((1, 2), jnp.float32)),
    reason=f"the softmax kernel is unavailable here: {softmax_xent.KERNEL.load()}",
)


def _reference(logits, targets, weights):
    z = logits - logits.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(-1))
    probs = np.exp(z - logsumexp[:, None])
    gold = np.take_along_axis(z, targets[:, None], -1)[:, 0]
    g = probs - np.eye(logits.shape[1])[targets]
    correct = np.argmax(logits, -1) == targets
    return g * weights[:, None], (logsumexp - gold) * weights, correct * weights


@pytest.mark.parametrize("V", [1, 7, 50, 8192])
def test_rows_match_numpy(V):
    rng = np.random.default_rng(V)
    N = 37  # not a multiple of the kernel's 8-row units
    logits = (rng.standard_normal((N, V)) * 4).astype(np.float32)
    logits[0, :] = 0.0  # all tied: only target 0 is right
    logits[1, :] = -100.0  # exp underflows far from the max
    logits[1, 0] = 100.0
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[:2] = 0
    weights = rng.uniform(0, 2, N).astype(np.float32)
    weights[2] = 0.0  # a padded position
    got = jax.jit(lambda *a: softmax_xent.rows(*a, gradient=True))(logits, targets, weights)
    for name, g, want in zip(("g", "nll", "correct"), got, _reference(logits, targets, weights)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-5, atol=2e-6, err_msg=name)


def test_ties_go_to_the_first_maximum():
    logits = np.array([[1.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    weights = np.ones(2, np.float32)
    for target, want in ((1, [1, 0]), (3, [0, 0])):
        targets = np.array([target, target * 0], np.int32)
        _, _, correct = softmax_xent.rows(logits, targets, weights, gradient=False)
        np.testing.assert_array_equal(np.asarray(correct), [want[0], 1.0])


def test_without_gradient_the_logits_are_left_alone():
    logits = np.random.default_rng(0).standard_normal((9, 11)).astype(np.float32)
    targets, weights = np.arange(9, dtype=np.int32), np.ones(9, np.float32)
    g, nll, _ = softmax_xent.rows(logits, targets, weights, gradient=False)
    np.testing.assert_array_equal(np.asarray(g), logits)
    np.testing.assert_allclose(nll, _reference(logits, targets, weights)[1], rtol=2e-5)


def test_out_of_range_targets_are_refused():
    logits, weights = np.zeros((2, 5), np.float32), np.ones(2, np.float32)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(
            softmax_xent.rows(logits, np.array([0, 5], np.int32), weights, gradient=True)
        )


def test_applies_follows_the_switch_and_dtype(monkeypatch):
    assert not softmax_xent.applies(jnp.zeros((2, 3), jnp.bfloat16))
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    assert not softmax_xent.applies(jnp.zeros((2, 3), jnp.float32))


def test_swiglu_backward_matches_autodiff():
    """swiglu_backward.cc against autodiff of silu(gate) * up, over the exp's whole
    range (large |gate| saturates the sigmoid) and a size that is not whole units."""
    if not swiglu_backward.applies(*[jnp.zeros(2)] * 3):
        pytest.skip(f"the SwiGLU kernel is unavailable here: {swiglu_backward.KERNEL.load()}")
    rng = np.random.default_rng(0)
    gate, up, dh = (rng.standard_normal((3, 7, 1001)).astype(np.float32) * 4 for _ in range(3))
    gate[0, 0, :4] = [-100.0, 100.0, 0.0, -0.0]
    got = jax.jit(swiglu_backward.backward)(gate, up, dh)
    with_h = jax.jit(lambda *a: swiglu_backward.backward(*a, with_h=True))(gate, up, dh)
    h, vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, jnp.asarray(gate), jnp.asarray(up))
    for name, g, want in zip(("dgate", "dup"), got, vjp(jnp.asarray(dh))):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5, err_msg=name)
    for name, g, want in zip(("dgate", "dup", "h"), with_h, (*got, h)):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5, err_msg=f"{name}, with h")


def test_rms_norm_kernels_match_xla(monkeypatch):
    """rms_norm_kernel.cc's forward and backward against layers.rms_norm in XLA's ops,
    with a row count that is not whole units and an odd width."""
    x32 = jnp.zeros((2, 3), jnp.float32)
    if not rms_norm_kernel.applies(x32, x32[0]):
        pytest.skip(f"the RMSNorm kernel is unavailable here: {rms_norm_kernel.KERNEL.load()}")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 37, 129)), jnp.float32) * 3
    scale = jnp.asarray(rng.standard_normal(129), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 37, 129)), jnp.float32)

    def value_and_vjp():
        y, vjp = jax.vjp(lambda x, s: layers.rms_norm(x, s, 1e-5), x, scale)
        return (y, *vjp(dy))

    kernel_step = jax.jit(lambda: value_and_vjp())  # a fresh trace per path
    assert "ftlib_rms_norm_bwd" in kernel_step.lower().as_text()
    got = kernel_step()
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    want = jax.jit(lambda: value_and_vjp())()
    for name, g, w in zip(("y", "dx", "dscale"), got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("tables_differentiated", [False, True])
def test_rope_kernel_matches_xla(monkeypatch, tables_differentiated):
    """rope_kernel.cc forward and transpose against layers.apply_rope in XLA's ops, with
    tables that are not cos/sin of one angle (each half its own), a row count that is not
    whole units; the tables' gradients (never needed from integer positions) through XLA."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 37, 5, 8)), jnp.float32)
    cos = jnp.asarray(rng.standard_normal((3, 37, 8)), jnp.float32)
    sin = jnp.asarray(rng.standard_normal((3, 37, 8)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    if not rope_kernel.applies(x, cos, sin):
        pytest.skip(f"the RoPE kernel is unavailable here: {rope_kernel.KERNEL.load()}")

    def value_and_vjp():
        if tables_differentiated:
            y, vjp = jax.vjp(layers.apply_rope, x, cos, sin)
        else:
            y, vjp = jax.vjp(lambda x: layers.apply_rope(x, cos, sin), x)
        return (y, *vjp(dy))

    kernel_step = jax.jit(lambda: value_and_vjp())  # a fresh trace per path
    assert kernel_step.lower().as_text().count("ftlib_rope") == 2  # forward and transpose
    got = kernel_step()
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    want = jax.jit(lambda: value_and_vjp())()
    assert len(got) == len(want) == (4 if tables_differentiated else 2)
    for name, g, w in zip(("y", "dx", "dcos", "dsin"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_layer_loop_computes_rope_tables_once():
    """XLA fuses cos and sin into each consumer of RoPE's tables; as the kernel's operands
    they are computed once, not per layer, head and direction (the layer loop of a LoRA
    train step, where nothing else stops the fusion)."""
    import dataclasses

    from flax import nnx
    from tiny_llama import CFG

    from configs import default
    from ftlib import peft
    from ftlib.models.llama import Llama

    model = Llama(dataclasses.replace(CFG, num_layers=3, scan_layers=False), rngs=nnx.Rngs(0))
    c = default.get_config().peft
    c.method = "lora"
    mask = peft.apply_method(model, c)
    graphdef, params, frozen = nnx.split(model, mask.filter, ...)
    ids = jnp.zeros((2, 8), jnp.int32)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, frozen)(ids) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count("ftlib_rope") == 3 * 2 * 2  # layers x (q, k) x (forward, transpose)
    assert hlo.count(" cosine(") == hlo.count(" sine(") == 1


def test_masked_softmax_matches_jax():
    rng = np.random.default_rng(3)
    B, K, R, S = 2, 3, 20, 37  # rows not a multiple of the kernel's 16-row units
    s = (rng.standard_normal((B, K, R, S)) * 5).astype(np.float32)
    keep = rng.random((B, R, S)) < 0.7
    keep[0, 0] = False  # a fully masked row (padding): uniform, as jax's softmax
    bias = np.where(keep, 0.0, attention.NEG_INF).astype(np.float32)
    got = jax.jit(masked_softmax.probs)(s, bias)
    want = jax.nn.softmax(s + bias[:, None], axis=-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got)[0, :, 0], 1.0 / S, rtol=1e-6)


@pytest.mark.parametrize(
    "path, K, blocks",
    [
        ("attention_kernel", 4, 4),
        ("attention_kernel", 2, 1),
        ("attention_kernel", 1, 4),
        ("masked_softmax", 2, 4),
    ],
)
def test_causal_attention_on_the_cpu_kernels_matches_xla(monkeypatch, path, K, blocks):
    """The attention kernel (attention_kernel.cc: the blocks read and written in place,
    its own softmax and backward) and the blocked ops around masked_softmax.cc, against
    XLA's ops: grouped query heads (N=4 over K), packed segments and a padded tail whose
    rows see no key (uniform probabilities in every path)."""
    import types

    rng = np.random.default_rng(4)
    B, T, N, H = 2, 64, 4, 8
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    pos = np.arange(T)
    segments = np.ones((B, T), np.int32)
    segments[0, 40:] = 2  # a second sequence packed into row 0
    segments[1, 50:] = 0  # padding
    same = (segments[:, :, None] == segments[:, None]) & (segments[:, :, None] > 0)
    mask = jnp.asarray((pos[:, None] >= pos[None, :]) & same)
    if path == "masked_softmax":
        stub = types.SimpleNamespace(applies=lambda *operands: False)
        monkeypatch.setattr(attention, "attention_kernel", stub)
    elif not attention_kernel.applies(q, k, v):  # needs MKL (x86-64 Linux)
        pytest.skip(f"the attention kernel is unavailable here: {attention_kernel.KERNEL.load()}")

    def loss_and_grads(q, k, v):
        f = lambda *a: jnp.sum(jnp.sin(attention.causal_attention(*a, mask, blocks)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    hlo = jax.jit(jax.grad(lambda *a: jnp.sum(attention.causal_attention(*a, mask, blocks))))
    hlo = hlo.lower(q, k, v).as_text()
    targets = ("ftlib_causal_attention_fwd", "ftlib_causal_attention_bwd")
    if path == "masked_softmax":
        targets = ("ftlib_masked_softmax",)
    assert all(t in hlo for t in targets), targets
    got = loss_and_grads(q, k, v)
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    want = loss_and_grads(q, k, v)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("T", [96, 130])
def test_attention_kernel_default_blocks_match_masked_attention(T):
    """causal_attention's own block choice on the kernel (one 96-row block; 130 = 2 x 65),
    one sequence, a broadcast [1, T, T] mask, against the plain masked attention."""
    rng = np.random.default_rng(T)
    q = jnp.asarray(rng.standard_normal((1, T, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, T, 2, 8)), jnp.float32) for _ in range(2))
    if not attention_kernel.applies(q, k, v):
        pytest.skip(f"the attention kernel is unavailable here: {attention_kernel.KERNEL.load()}")
    mask = jnp.tril(jnp.ones((1, T, T), bool))

    def loss_and_grads(fn):
        f = lambda *a: jnp.sum(jnp.sin(fn(*a, mask)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    got = loss_and_grads(attention.causal_attention)
    want = loss_and_grads(attention.attention)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
