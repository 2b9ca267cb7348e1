"""The hand-written backward passes (causal block attention, Linear's matmul, the
LoRA product, the fused LM head + loss) must give autodiff's values and gradients."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ftlib.linear_cross_entropy import is_first_max, linear_cross_entropy
from ftlib.models.attention import (
    attention,
    causal_attention,
    query_blocks,
    resolve_impl,
    unpacked_lengths,
)
from ftlib.models.layers import matmul, rms_norm, swiglu
from ftlib.models.products import (
    MatmulProduct,
    shared_input_applies,
    shared_input_products,
    swiglu_product,
    swiglu_product_applies,
)
from ftlib.peft import lora
from ftlib.peft.lora import lora_product


def _packed_segments(B, T):
    """Segment ids: two packed segments and trailing padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    seg[:, : T // 2] = 1
    seg[:, T // 2 : T - T // 8] = 2
    seg[1, T // 4 :] = 0  # a row that is mostly padding
    return jnp.asarray(seg)


def _segment_mask(B, T):
    """Causal within the segments of _packed_segments."""
    seg = _packed_segments(B, T)
    return jnp.tril(jnp.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])


def _vjp(fn, *args, cotangent):
    """-> (fn(*args), its VJP at `cotangent`), jitted (eager dispatch is slow)."""

    def value_and_pullback(*args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangent)

    return jax.jit(value_and_pullback)(*args)


def _assert_matches_plain_attention(causal_fn, B, T, heads, kv_heads, H, seed):
    """causal_fn(q, k, v, mask) gives `attention`'s values and gradients on random
    inputs with packed segments, padding and GQA."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, heads, H))
    k = jax.random.normal(keys[1], (B, T, kv_heads, H))
    v = jax.random.normal(keys[2], (B, T, kv_heads, H))
    g = jax.random.normal(keys[3], (B, T, heads, H))
    mask = _segment_mask(B, T)
    want, want_grads = _vjp(lambda *a: attention(*a, mask), q, k, v, cotangent=g)
    got, got_grads = _vjp(lambda *a: causal_fn(*a, mask), q, k, v, cotangent=g)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for name, a, b in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("heads,kv_heads,num_blocks", [(4, 4, 1), (4, 2, 2), (6, 1, 4), (4, 4, 8)])
def test_causal_attention_matches_plain_attention(heads, kv_heads, num_blocks):
    def blocked(q, k, v, mask):
        return causal_attention(q, k, v, mask, num_blocks)

    _assert_matches_plain_attention(blocked, 2, 32, heads, kv_heads, 8, seed=0)


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


def test_bf16_matmuls_accumulate_in_float32_on_cpu():
    """XLA:CPU gives bf16 x bf16 products its fast kernels only with a float32 result
    (layers.dot): Linear's and the LoRA product's forward and backward products, and
    the plain attention's, must ask for one, and still return bf16."""
    x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16)
    assert matmul(x, w).dtype == jnp.bfloat16

    def loss(x, w):
        return matmul(x, w).astype(jnp.float32).sum()

    assert _dot_results(jax.value_and_grad(loss, argnums=(0, 1)), x, w, count=3)

    a, b = jnp.ones((2, 8), jnp.bfloat16), jnp.ones((2, 16), jnp.bfloat16)  # LoRA, rank 2

    def lora_loss(x, a, b):
        return lora_product(2.0, x, a, b).astype(jnp.float32).sum()

    assert lora_product(2.0, x, a, b).dtype == jnp.bfloat16
    assert _dot_results(jax.value_and_grad(lora_loss, argnums=(0, 1, 2)), x, a, b, count=6)

    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)  # the plain attention of decoding
    mask = jnp.ones((1, 4, 4), bool)
    assert attention(q, q, q, mask).dtype == jnp.bfloat16
    assert _dot_results(lambda q: attention(q, q, q, mask), q, count=2)


def _dot_results(fn, *args, count):
    """Whether the `count` products in fn's lowering all have float32 results."""
    hlo = jax.jit(fn).lower(*args).as_text()
    results = [line.rsplit("->", 1)[-1] for line in hlo.splitlines() if "dot_general" in line]
    assert len(results) == count, results
    return all("xf32>" in r for r in results)


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


def _plain_rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_rms_norm_and_swiglu_gradients_match_autodiff(dtype, atol):
    keys = jax.random.split(jax.random.key(3), 6)
    x = (3 * jax.random.normal(keys[0], (2, 7, 32))).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(keys[1], (32,))
    dy = jax.random.normal(keys[2], (2, 7, 32)).astype(dtype)
    got, got_grads = _vjp(lambda x, s: rms_norm(x, s, 1e-5), x, scale, cotangent=dy)
    want, want_grads = _vjp(lambda x, s: _plain_rms_norm(x, s, 1e-5), x, scale, cotangent=dy)
    gate, up, dh = (jax.random.normal(k, (2, 7, 48)).astype(dtype) for k in keys[3:])
    got_h, got_h_grads = _vjp(swiglu, gate, up, cotangent=dh)
    want_h, want_h_grads = _vjp(lambda g, u: jax.nn.silu(g) * u, gate, up, cotangent=dh)
    for a, b in zip(
        (got, got_h, *got_grads, *got_h_grads), (want, want_h, *want_grads, *want_h_grads)
    ):
        assert a.dtype == b.dtype
        scale_ = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol * scale_
        )


def _saved_residuals(fn, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda *a: jnp.sum(fn(*a)), *args)
    return out.getvalue().splitlines()


def test_rms_norm_and_swiglu_save_only_their_inputs_for_the_backward():
    """What makes them worth a custom VJP: autodiff saves 5 residuals each here."""
    x, scale = jnp.ones((4, 8)), jnp.ones((8,))
    assert _saved_residuals(swiglu, x, x) == [
        "f32[4,8] from the argument a[0]",
        "f32[4,8] from the argument a[1]",
    ]
    norm = _saved_residuals(lambda x, s: rms_norm(x, s, 1e-5), x, scale)
    assert len(norm) == 3 and sum(line.startswith("f32[4,8]") for line in norm) == 1, norm


def test_swiglu_product_saves_its_inputs_not_swiglus_output():
    """The MLP's path on the CPU kernels saves gate, up and the projection's params (and
    LoRA's rank-r xa), not h = swiglu(gate, up)."""
    x, w, a, b = jnp.ones((4, 8)), jnp.ones((8, 3)), jnp.ones((2, 8)), jnp.ones((2, 3))
    if not swiglu_product_applies(x, x, (w, a, b)):
        pytest.skip("swiglu_product runs on ftlib's CPU kernels only")
    plain = lambda g, u, w: swiglu_product(MatmulProduct(), g, u, (w,))  # noqa: E731
    inputs = ["f32[4,8] from the argument a[0]", "f32[4,8] from the argument a[1]"]
    assert _saved_residuals(plain, x, x, w) == [*inputs, "f32[8,3] from the argument a[2]"]
    with_lora = lambda g, u, *p: swiglu_product(lora.AccumulatedProduct(2.0), g, u, p)  # noqa: E731
    saved = _saved_residuals(with_lora, x, x, w, a, b)
    assert saved[:5] == [
        *inputs,
        *(
            f"{t} from the argument a[{i}]"
            for i, t in enumerate(("f32[8,3]", "f32[2,8]", "f32[2,3]"), start=2)
        ),
    ]
    assert len(saved) == 6 and saved[5].startswith("f32[4,2] "), saved


def test_shared_input_products_save_their_input_once():
    """q, k, v-like projections of one x: x saved once, not once per projection."""
    x, w, a, b = jnp.ones((4, 8)), jnp.ones((8, 3)), jnp.ones((2, 8)), jnp.ones((2, 3))
    params = ((w,), (w, a, b), (w,))
    if not shared_input_applies(x, params):
        pytest.skip("shared_input_products runs on ftlib's CPU kernels only")
    products = (MatmulProduct(), lora.AccumulatedProduct(2.0), MatmulProduct())
    saved = _saved_residuals(lambda x, p: sum(shared_input_products(products, x, p)), x, params)
    assert sum(line.startswith("f32[4,8] ") for line in saved) == 1, saved


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


def test_lora_in_product_gradients_match_autodiff():
    """[x | s xd A^T] @ [W; B] (LoRA's adapter inside the base product, on GPUs for
    wide projections) gives x W + s (xd A^T) B and its gradients, xd (the dropped-out
    input) apart from x."""
    keys = jax.random.split(jax.random.key(4), 6)
    x, xd = (jax.random.normal(k, (3, 5, 16)) for k in keys[:2])
    w = jax.random.normal(keys[2], (16, 24))
    a = jax.random.normal(keys[3], (4, 16))
    b = jax.random.normal(keys[4], (4, 24))
    g = jax.random.normal(keys[5], (3, 5, 24))
    reference = lambda x, xd, w, a, b: x @ w + 2.0 * (xd @ a.T) @ b
    want, want_grads = _vjp(reference, x, xd, w, a, b, cotangent=g)
    fused = lambda *args: lora.in_product(2.0, *args)
    got, got_grads = _vjp(fused, x, xd, w, a, b, cotangent=g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for name, p, q in zip(("x", "xd", "w", "a", "b"), got_grads, want_grads):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-3, err_msg=f"d{name}")


@pytest.mark.parametrize("d_out", [24, 8])
def test_lora_linear_in_product_path_matches_two_products(monkeypatch, d_out):
    """LoRALinear with the in-product path forced on (a GPU's choice for wide
    projections) gives the two-product path's outputs and adapter gradients, with
    dropout and a bias."""
    from flax import nnx

    from ftlib.models.layers import Linear

    rngs = nnx.Rngs(0)
    base = Linear(16, d_out, ("embed", "mlp"), rngs=rngs, use_bias=True)
    layer = lora.LoRALinear(base, 4, 8.0, 0.25, False, rngs=rngs)
    layer.lora_b[...] = jax.random.normal(jax.random.key(5), layer.lora_b.shape)
    base.bias[...] = jax.random.normal(jax.random.key(6), base.bias.shape)
    x = jax.random.normal(jax.random.key(7), (2, 3, 16))

    monkeypatch.setattr(lora, "adapter_accumulated", lambda *operands: False)

    def loss_and_grads(fused):
        monkeypatch.setattr(lora, "adapter_in_base_product", lambda d_in, d_out: fused)
        loss = lambda m, x: jnp.sum(jnp.sin(m(x, jax.random.key(8))))
        return nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)

    (want, (want_m, want_x)), (got, (got_m, got_x)) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
    for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(got_m[name][...], want_m[name][...], rtol=1e-4, atol=1e-5)


def _plain_head_loss(h_BTD, w_DV, targets_BT, weight_BT):
    logits = (h_BTD @ w_DV).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)
    correct = jnp.argmax(logits, axis=-1) == targets_BT
    return jnp.sum(nll * weight_BT), jnp.sum(correct * weight_BT)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("T", [37, 64])  # 37: padded up to whole blocks; 64: exact blocks
def test_linear_cross_entropy_matches_head_then_loss(vocab_major, T):
    B, D, V = 3, 16, 50
    keys = jax.random.split(jax.random.key(1), 4)
    h = jax.random.normal(keys[0], (B, T, D))
    w = jax.random.normal(keys[1], (D, V)) * 0.3
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    weight = (jax.random.uniform(keys[3], (B, T)) > 0.3) * 1.5
    w_in = w.T if vocab_major else w

    def fused(h, w_in):
        return linear_cross_entropy(h, w_in, targets, weight, vocab_major=vocab_major)

    def plain(h, w_in):
        return _plain_head_loss(h, w_in.T if vocab_major else w_in, targets, weight)

    cot = (jnp.float32(2.5), jnp.float32(0.0))
    (nll, correct), (dh, dw) = _vjp(fused, h, w_in, cotangent=cot)
    (nll_ref, correct_ref), (dh_ref, dw_ref) = _vjp(plain, h, w_in, cotangent=cot)
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5)
    assert correct == correct_ref
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_is_first_max_agrees_with_argmax_on_ties():
    """Accuracy counts argmax == target; ties go to the first maximum, as argmax's do
    (an all-equal row, e.g. a zero-initialised head, is right only for target 0)."""
    V = 7
    logits = np.random.default_rng(0).normal(size=(6, V)).astype(np.float32)
    logits[1] = 0.0  # all tied
    logits[2, [1, 4]] = 9.0  # two maxima: the first (1) is argmax, 4 is not
    logits[3, [1, 4]] = 9.0
    logits[4, :3] = -np.inf  # masked entries
    targets = np.array([int(np.argmax(logits[0])), 0, 1, 4, 5, 3])
    for t in range(V):  # every target, so both outcomes are checked on every row
        targets_t = (targets + t) % V
        got = is_first_max(jnp.asarray(logits), jnp.max(logits, -1), jnp.asarray(targets_t))
        np.testing.assert_array_equal(got, np.argmax(logits, -1) == targets_t)


def test_linear_cross_entropy_frozen_head_skips_the_weight_gradient():
    """With the head frozen (LoRA) only dh is computed: the compiled step has one
    fewer [D, V]-sized product than when the head trains."""
    B, T, D, V = 2, 8, 16, 40
    h, w = jnp.ones((B, T, D)), jnp.ones((D, V)) * 0.1
    targets, weight = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))

    def loss(h, w):
        return linear_cross_entropy(h, w, targets, weight)[0]

    def dots(fn, *args):
        text = jax.jit(fn).lower(*args).as_text()  # XLA's products, or MKL's custom calls
        return len(re.findall(r"dot_general|custom_call @ftlib_sgemm", text))

    only_h = dots(jax.grad(loss), h, w)
    both = dots(jax.grad(loss, argnums=(0, 1)), h, w)
    assert only_h == both - 1
    np.testing.assert_allclose(
        jax.grad(loss)(h, w),
        jax.grad(lambda h: _plain_head_loss(h, w, targets, weight)[0])(h),
        atol=1e-6,
    )


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_pallas_flash_attention_matches_plain_attention(heads, kv_heads):
    """The GPU flash kernel (run by the Pallas interpreter here) with segment ids and
    GQA gives the masked attention's values and gradients."""
    B, T, H = 2, 128, 16
    seg = _packed_segments(B, T)

    def flash(q, k, v, mask):
        return causal_attention(q, k, v, mask, segment_ids_BT=seg, impl="pallas")

    _assert_matches_plain_attention(flash, B, T, heads, kv_heads, H, seed=2)


def test_attention_impl_falls_back_to_blocked_when_a_kernel_cannot_run():
    assert resolve_impl("auto", jnp.bfloat16, 256, 64, True) == "blocked"  # CPU
    assert resolve_impl("pallas", jnp.float32, 256, 64, False) == "blocked"  # no segment ids
    assert resolve_impl("pallas", jnp.float32, 200, 64, True) == "blocked"  # T % 128
    assert resolve_impl("pallas", jnp.float32, 256, 64, True) == "pallas"
    assert resolve_impl("cudnn", jnp.float32, 256, 64, True) == "blocked"  # cuDNN: half only
    assert resolve_impl("cudnn", jnp.bfloat16, 256, 64, True) == "cudnn"
    assert resolve_impl("cudnn", jnp.bfloat16, 256, 256, True) == "blocked"  # wide heads
    with pytest.raises(ValueError, match="flash"):
        resolve_impl("flash", jnp.float32, 256, 64, True)


def test_unpacked_rows_are_recognised_for_the_cudnn_length_mask():
    lengths, unpacked = unpacked_lengths(jnp.asarray([[1, 1, 1, 0], [2, 2, 2, 2]]))
    assert lengths.tolist() == [3, 4] and bool(unpacked)
    for packed_or_odd in ([[1, 1, 2, 2]], [[1, 0, 1, 1]], [[0, 0, 0, 0]], [[0, 1, 1, 1]]):
        assert not bool(unpacked_lengths(jnp.asarray(packed_or_odd))[1]), packed_or_odd


def test_train_step_reads_the_gradients_from_their_own_buffers():
    """Under the GPU's layer loop a stacked param's gradient is the layers' products
    concatenated; fused into the norm reductions it cost 73 of llama-1b's 296 ms on an
    H100. The step must pass every gradient through one optimization barrier before
    the optimizer and grad_norm read them (reverting steps.materialized fails this)."""
    import tiny_llama
    from flax import nnx

    from configs import default
    from ftlib import peft, steps
    from ftlib.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=8, scan_layers=False,
    )  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(0))
    peft_cfg = default.get_config().peft
    peft_cfg.method = "full"
    tx = optax.adamw(1e-3)
    graphdef, state, frozen = steps.init_train_state(model, peft.apply_method(model, peft_cfg), tx)
    batch = tiny_llama.batch(0, cfg, B=2, T=8)
    jaxpr = jax.make_jaxpr(steps.make_train_step(graphdef, tx))(state, frozen, batch).jaxpr
    grad_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert any(sorted(v.aval.shape for v in e.outvars) == grad_shapes for e in barriers)
