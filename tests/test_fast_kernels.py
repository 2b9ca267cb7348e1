"""The hand-written backward passes (causal block attention, Linear's matmul, the
LoRA product) must give autodiff's values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlib.models.attention import attention, causal_attention, query_blocks
from ftlib.models.layers import matmul
from ftlib.peft.lora import lora_product


def _segment_mask(B, T):
    """Causal, two packed segments and trailing padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    seg[:, : T // 2] = 1
    seg[:, T // 2 : T - T // 8] = 2
    seg[1, T // 4 :] = 0  # a row that is mostly padding
    seg = jnp.asarray(seg)
    return jnp.tril(jnp.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])


def _vjp(fn, *args, cotangent):
    """-> (fn(*args), its VJP at `cotangent`), jitted (eager dispatch is slow)."""

    def value_and_pullback(*args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangent)

    return jax.jit(value_and_pullback)(*args)


@pytest.mark.parametrize("heads,kv_heads,num_blocks", [(4, 4, 1), (4, 2, 2), (6, 1, 4), (4, 4, 8)])
def test_causal_attention_matches_plain_attention(heads, kv_heads, num_blocks):
    B, T, H = 2, 32, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, heads, H))
    k = jax.random.normal(keys[1], (B, T, kv_heads, H))
    v = jax.random.normal(keys[2], (B, T, kv_heads, H))
    g = jax.random.normal(keys[3], (B, T, heads, H))
    mask = _segment_mask(B, T)
    want, want_grads = _vjp(lambda *a: attention(*a, mask), q, k, v, cotangent=g)
    got, got_grads = _vjp(lambda *a: causal_attention(*a, mask, num_blocks), q, k, v, cotangent=g)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for name, a, b in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"d{name}")


def test_causal_attention_bfloat16_close_to_float32():
    B, T, N, H = 2, 64, 4, 16
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (B, T, N, H)) for key in keys)
    mask = _segment_mask(B, T)
    want = causal_attention(q, k, v, mask)
    got = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_query_blocks_divide_the_sequence():
    assert query_blocks(256) == 2 and query_blocks(512) == 4 and query_blocks(100) == 1
    for T in (7, 96, 130, 384, 4096):
        assert T % query_blocks(T) == 0


def test_matmul_gradients_match_autodiff():
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (3, 5, 16))
    w = jax.random.normal(keys[1], (16, 24))
    g = jax.random.normal(keys[2], (3, 5, 24))
    want, want_grads = _vjp(jnp.dot, x, w, cotangent=g)
    got, got_grads = _vjp(matmul, x, w, cotangent=g)
    np.testing.assert_allclose(got, want, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_lora_product_gradients_match_autodiff():
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (3, 5, 16))
    a = jax.random.normal(keys[1], (4, 16))
    b = jax.random.normal(keys[2], (4, 24))
    g = jax.random.normal(keys[3], (3, 5, 24))
    reference = lambda x, a, b: 2.0 * (x @ a.T) @ b
    want, want_grads = _vjp(reference, x, a, b, cotangent=g)
    got, got_grads = _vjp(lambda *args: lora_product(2.0, *args), x, a, b, cotangent=g)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for name, p, q in zip(("x", "a", "b"), got_grads, want_grads):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-4, err_msg=f"d{name}")
