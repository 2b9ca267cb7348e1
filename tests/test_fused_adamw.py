"""optim.apply_gradients' fused AdamW (adamw_kernel.cc) against optax's chain: same
params, moments and counts over several steps, clipped or not, decayed or not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ftlib import fused_adamw, optim
from ftlib.errors import FtlibError

pytestmark = pytest.mark.skipif(
    not fused_adamw.applies(jnp.zeros(2, jnp.float32)),
    reason=f"the AdamW kernel is unavailable here: {fused_adamw.KERNEL.load()}",
)


def _optimizer(clip: float, accumulate: int = 1):
    cfg = default.get_config().optim
    cfg.update(dict(grad_clip_norm=clip, warmup_steps=3, grad_accum_steps=accumulate))
    cfg.weight_decay = 0.1  # large enough for its term to show in the comparison
    return optim.make_optimizer(cfg, 20)


def _params(rng):
    # 40,000 elements: several of the kernel's 16,384-element work units, the last short.
    return {
        "big": jnp.asarray(rng.normal(size=(40_000,)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(30, 7)), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=(7,)), jnp.float32),  # no weight decay
        "empty": jnp.zeros((0, 7), jnp.float32),
    }


def _optax_step(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)


def _assert_close(got, want):
    """Leaf by leaf to a few ulps of the leaf's largest value: XLA fuses some of optax's
    multiply-adds, the kernel rounds each product."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        elif a.size:
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(a, b, rtol=0, atol=4e-7 * scale)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fused_steps_match_optax(clip):
    rng = np.random.default_rng(0)
    tx = _optimizer(clip)
    fused = jax.jit(lambda *a: optim.apply_gradients(tx, *a), donate_argnums=(1, 2))
    reference = jax.jit(lambda *a: _optax_step(tx, *a))
    params = _params(rng)
    hlo = fused.lower(params, tx.init(params), params).as_text()
    assert "ftlib_adamw" in hlo and ("ftlib_sum_squares" in hlo) == bool(clip)
    got = want = (params, tx.init(params))
    for step in range(8):
        # First gradients so small that eps outweighs sqrt(v), then norms far above and
        # below the clip norm, so both sides are taken.
        size = 1e-9 if step < 2 else (10.0, 1e-3)[step % 2]
        grads = jax.tree.map(
            lambda x: jnp.asarray(size * rng.normal(size=x.shape), x.dtype), params
        )
        p_ref, s_ref, norm_ref = reference(grads, want[1], want[0])
        p, s, norm = fused(grads, *jax.tree.map(jnp.copy, (got[1], got[0])))  # donated
        np.testing.assert_allclose(norm, norm_ref, rtol=1e-5)
        _assert_close((p, s), (p_ref, s_ref))
        # Each step starts both from the reference's state, so differences never compound
        # and every step is compared at a few ulps.
        got = want = (p_ref, s_ref)
    assert int(s[1][0].count) == 8 and int(s[1][2].count) == 8


def test_a_nan_gradient_spreads_as_in_optax():
    params = _params(np.random.default_rng(2))
    grads = jax.tree.map(jnp.ones_like, params)
    grads["w"] = grads["w"].at[0, 0].set(jnp.nan)
    for clip in (0.0, 1.0):
        tx = _optimizer(clip)
        got = jax.jit(lambda *a: optim.apply_gradients(tx, *a))(grads, tx.init(params), params)
        want = _optax_step(tx, grads, tx.init(params), params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(jnp.isnan(a), jnp.isnan(b))


def test_accumulation_and_the_switch_keep_optax(monkeypatch):
    params = _params(np.random.default_rng(1))
    accumulating = _optimizer(1.0, accumulate=2)
    step = jax.jit(lambda *a: optim.apply_gradients(accumulating, *a))
    assert "ftlib_adamw" not in step.lower(params, accumulating.init(params), params).as_text()
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    tx = _optimizer(1.0)
    step = jax.jit(lambda *a: optim.apply_gradients(tx, *a))
    assert "ftlib_adamw" not in step.lower(params, tx.init(params), params).as_text()


def test_a_negative_clip_norm_is_refused():
    with pytest.raises(FtlibError, match="grad_clip_norm=-1.0"):
        _optimizer(-1.0)
