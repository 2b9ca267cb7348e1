"""ftlib.layer_view: a layer of a stacked weight read in place by MKL's products, its
gradient where something differentiates it, and which leaves the layer stack views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlib import mkl_gemm
from ftlib.layer_view import LayerView
from ftlib.models import layer_stack, products

L, M, K, N = 3, 5, 6, 4


def _stack_and_input():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(k1, (L, K, N)),
        jax.random.normal(k2, (M, K)),
        jax.random.normal(k3, (M, N)),
    )


def _needs_mkl(*operands):
    if not mkl_gemm.applies(*operands):
        pytest.skip("MKL's products do not run here")


def test_view_slices_on_read():
    stack, _, _ = _stack_and_input()
    view = LayerView(stack, jnp.int32(2))
    assert view.shape == (K, N) and view.ndim == 2 and view.dtype == stack.dtype
    np.testing.assert_array_equal(view[...], stack[2])
    assert view.astype(jnp.float32) is view
    np.testing.assert_array_equal(view.astype(jnp.bfloat16), stack[2].astype(jnp.bfloat16))


def test_gemm_reads_the_layer_in_place():
    stack, x, g = _stack_and_input()
    _needs_mkl(x, stack)

    def products_of(stack, x, g, i):  # i traced, as the scan's layer index
        view = LayerView(stack, i)
        y = mkl_gemm.gemm(x, view)
        dx = mkl_gemm.gemm_accumulate(jnp.ones_like(x), g, view, transpose_b=True)
        return y, dx

    fn = jax.jit(products_of)
    for i in range(L):
        y, dx = fn(stack, x, g, jnp.int32(i))
        np.testing.assert_allclose(y, x @ stack[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, 1 + g @ stack[i].T, rtol=1e-5, atol=1e-5)
    hlo = fn.lower(stack, x, g, jnp.int32(0)).as_text()
    assert "ftlib_sgemm_layer" in hlo and "ftlib_sgemm_acc_layer" in hlo
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(fn(stack, x, g, jnp.int32(L)))


def test_view_gradient_lands_at_its_layer():
    """Views are made for frozen weights only, but their cotangent is still right."""
    stack, x, _ = _stack_and_input()
    _needs_mkl(x, stack)

    def loss(stack, sliced):
        w = stack[1] if sliced else LayerView(stack, jnp.int32(1))
        (y,) = products.shared_input_products((products.MatmulProduct(),), x, ((w,),))
        return jnp.sum(jnp.sin(y))

    got, want = jax.grad(loss)(stack, False), jax.grad(loss)(stack, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(got[0]) and np.any(got[1])


def test_viewed_leaves_are_frozen_stacks_of_matrices():
    stack, x, _ = _stack_and_input()
    _needs_mkl(x, stack)
    xs = {"frozen": stack, "trained": stack + 1, "norm": stack[:, 0], "keys": None}
    seen = []

    def loss(h, trained, norm):
        seen.append(layer_stack.viewed(h, dict(xs, trained=trained, norm=norm)))
        return jnp.sum(h) + jnp.sum(trained) + jnp.sum(norm)

    args = (x, xs["trained"], xs["norm"])
    jax.grad(loss, argnums=1)(*args)  # a stack trains
    jax.grad(loss, argnums=0)(*args)  # only the layers' input trains (prompt tuning)
    jax.grad(loss, argnums=2)(*args)  # only a vector trains (IA3, BitFit)
    loss(*args)  # no autodiff: nothing known, nothing viewed
    with layer_stack.forward_only():  # declared: nothing differentiates
        loss(*args)
    # Leaves in key order: frozen, norm, trained.
    both = [True, False, True]
    assert seen == [[True, False, False], both, both, [False, False, False], both]
