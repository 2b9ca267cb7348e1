"""The MKL products (ftlib/mkl_gemm.py) against numpy, and the model code that calls
them against XLA's products: the same values and gradients either way."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlib import mkl_gemm
from ftlib.errors import FtlibError
from ftlib.linear_cross_entropy import linear_cross_entropy
from ftlib.models.layers import matmul

needs_mkl = pytest.mark.skipif(
    jax.default_backend() != "cpu" or mkl_gemm.KERNEL.load() is not None,
    reason=f"the MKL kernel is unavailable here: {mkl_gemm.KERNEL.load()}",
)


@needs_mkl
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 3), (300, 2, 17), (2, 300, 17), (129, 77, 65)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_matches_numpy(m, n, k, transpose_a, transpose_b):
    rng = np.random.default_rng(m * n * k)
    a = rng.standard_normal((k, m) if transpose_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    c = rng.standard_normal((m, n), dtype=np.float32)
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    got = jax.jit(lambda a, b: mkl_gemm.gemm(a, b, **flags))(a, b)
    summed = jax.jit(lambda c, a, b: mkl_gemm.gemm_accumulate(c, a, b, **flags))(c, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(summed, c + want, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False)])
def test_batched_gemm_matches_numpy(batch, transpose_a, transpose_b):
    rng = np.random.default_rng(len(batch))
    m, n, k = 6, 9, 4
    a = rng.standard_normal((*batch, *((k, m) if transpose_a else (m, k))), dtype=np.float32)
    b = rng.standard_normal((*batch, *((n, k) if transpose_b else (k, n))), dtype=np.float32)
    want = (np.swapaxes(a, -1, -2) if transpose_a else a) @ (
        np.swapaxes(b, -1, -2) if transpose_b else b
    )
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    got = jax.jit(lambda a, b: mkl_gemm.gemm(a, b, **flags))(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    empty = mkl_gemm.gemm(jnp.ones((*batch, 3, 0)), jnp.ones((*batch, 0, 4)))  # K = 0
    np.testing.assert_array_equal(empty, np.zeros((*batch, 3, 4)))


def test_einsum_transposes_reads_batched_matmul_specs():
    assert mkl_gemm.einsum_transposes("bkrh,bksh->bkrs") == (False, True)
    assert mkl_gemm.einsum_transposes("bkrs,bkrh->bksh") == (True, False)
    assert mkl_gemm.einsum_transposes("ij,jk->ik") == (False, False)
    for spec in ("...d,rd->...r", "ij,jk->ki", "btkgh,bskh->bkgts", "ij,jk->ij", "bij,cjk->bik"):
        assert mkl_gemm.einsum_transposes(spec) is None, spec


@needs_mkl
def test_gemm_under_vmap_and_mismatched_sizes():
    a = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    b = jnp.ones((4, 5), jnp.float32)
    got = jax.jit(jax.vmap(lambda a: mkl_gemm.gemm(a, b)))(a)
    np.testing.assert_allclose(got, a @ b)
    with pytest.raises(ValueError, match="contracting sizes differ"):
        mkl_gemm.gemm(a[0], b.T)


@needs_mkl
def test_gemm_registers_the_kernel_on_first_use():
    """A fresh process calling gemm before anything asked `applies` (a benchmark)."""
    code = (
        "import jax, jax.numpy as jnp; from ftlib import mkl_gemm; "
        "print(float(jax.jit(mkl_gemm.gemm)(jnp.ones((3, 4)), jnp.ones((4, 5))).sum()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "60.0"


def _applies_in_fresh_process(**env):
    """`mkl_gemm.applies` asked in a new process (its kernel load is once per process)
    with these environment variables -> the finished process."""
    code = (
        "import jax.numpy as jnp; from ftlib import mkl_gemm; x = jnp.ones((2, 2)); "
        "print('applies', mkl_gemm.applies(x, x))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_without_a_compiler_products_stay_in_xla_or_the_switch_fails(tmp_path):
    """A fresh process, an empty kernel cache and no compiler: `auto` warns once and
    keeps XLA's products; `mkl` is an FtlibError naming the reason."""
    env = {"FTLIB_CACHE": str(tmp_path), "CXX": "no-such-compiler"}
    auto = _applies_in_fresh_process(**env)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert auto.stdout.strip().endswith("applies False")
    assert "fp32 CPU products stay in XLA: no C++ compiler" in auto.stderr
    forced = _applies_in_fresh_process(**env, FTLIB_CPU_GEMM="mkl")
    assert forced.returncode != 0
    assert "Unavailable: FTLIB_CPU_GEMM=mkl: no C++ compiler" in forced.stderr  # an FtlibError


def test_an_unwritable_kernel_cache_keeps_xla_products(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = _applies_in_fresh_process(FTLIB_CACHE=str(blocker / "cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("applies False")
    assert "fp32 CPU products stay in XLA" in done.stderr


def test_applies_only_to_float32_and_follows_the_switch(monkeypatch):
    x = jnp.ones((4, 4), jnp.float32)
    assert not mkl_gemm.applies(x.astype(jnp.bfloat16), x)
    huge_rows = jax.ShapeDtypeStruct((2**16, 2**16, 4), jnp.float32)  # 2^32 rows merged
    assert not mkl_gemm.applies(huge_rows, x)
    monkeypatch.setenv("FTLIB_CPU_GEMM", "xla")
    assert not mkl_gemm.applies(x, x)
    monkeypatch.setenv("FTLIB_CPU_GEMM", "blas")
    with pytest.raises(FtlibError, match="FTLIB_CPU_GEMM='blas'"):
        mkl_gemm.applies(x, x)


def _in_both(monkeypatch, fn, *args):
    """fn(*args) traced once with MKL's products and once with XLA's."""
    out = {}
    for mode in ("mkl", "xla"):
        monkeypatch.setenv("FTLIB_CPU_GEMM", mode)
        out[mode] = jax.jit(lambda *a: fn(*a))(*args)  # a fresh trace per mode
    return out["mkl"], out["xla"]


@needs_mkl
def test_matmul_values_and_gradients_match_xla(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 16), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((16, 24), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((2, 9, 24), dtype=np.float32))

    def value_and_grads(x, w):
        y, vjp = jax.vjp(matmul, x, w)
        return (y, *vjp(g))

    for got, want in zip(*_in_both(monkeypatch, value_and_grads, x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("vocab_major", [False, True])
def test_linear_cross_entropy_matches_xla(monkeypatch, vocab_major):
    rng = np.random.default_rng(1)
    B, T, D, V = 2, 13, 32, 50  # T not a multiple of the block: padded positions too
    h = jnp.asarray(rng.standard_normal((B, T, D), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((V, D) if vocab_major else (D, V), dtype=np.float32))
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    weight = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)

    def loss_and_grads(h, w):
        loss = lambda h, w: linear_cross_entropy(  # noqa: E731
            h, w, targets, weight, vocab_major=vocab_major
        )[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    got, want = _in_both(monkeypatch, loss_and_grads, h, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("method", ["full", "lora"])
def test_tiny_training_run_logs_the_same_losses_with_either_products(monkeypatch, tmp_path, method):
    import json

    from tiny_runs import run_tiny

    losses = {}
    for mode in ("mkl", "xla"):
        monkeypatch.setenv("FTLIB_CPU_GEMM", mode)
        (tmp_path / mode).mkdir()
        workdir = run_tiny(tmp_path / mode / "run", max_steps=4, method=method)
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if r["split"] in ("train", "val")]
    assert len(losses["mkl"]) >= 2
    np.testing.assert_allclose(losses["mkl"], losses["xla"], rtol=1e-4)


@needs_mkl
def test_lora_product_values_and_gradients_match_xla(monkeypatch):
    from ftlib.peft.lora import lora_product

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 7, 12), dtype=np.float32))
    a = jnp.asarray(rng.standard_normal((4, 12), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((4, 10), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((2, 7, 10), dtype=np.float32))

    def value_and_grads(x, a, b):
        y, vjp = jax.vjp(lambda x, a, b: lora_product(0.5, x, a, b), x, a, b)
        return (y, *vjp(g))

    for got, want in zip(*_in_both(monkeypatch, value_and_grads, x, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _lora_layer(rate=0.0, bias=False, base_dtype=jnp.float32, compute_dtype=jnp.float32):
    """A LoRALinear 12 -> 20, rank 4, alpha 8 (scale 2), with a nonzero B."""
    from flax import nnx

    from ftlib.models.layers import Linear
    from ftlib.peft import lora

    rngs = nnx.Rngs(0)
    base = Linear(12, 20, ("embed", "mlp"), rngs=rngs, use_bias=bias, dtype=compute_dtype)
    layer = lora.LoRALinear(base, 4, 8.0, rate, False, rngs=rngs)
    layer.lora_b[...] = jax.random.normal(jax.random.key(5), layer.lora_b.shape)
    base.kernel[...] = base.kernel[...].astype(base_dtype)
    return layer


@needs_mkl
@pytest.mark.parametrize("rate", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_accumulated_product_matches_xla(monkeypatch, rate, bias):
    """LoRALinear on MKL adds the adapter's product into the base product's buffer
    (and, without dropout, the adapter's dx into the base's): its output and the
    gradients of x, the base kernel and both factors are those of XLA's two products
    and add."""
    from flax import nnx

    graphdef, params = nnx.split(_lora_layer(rate, bias))
    x = jax.random.normal(jax.random.key(7), (2, 9, 12))
    g = jax.random.normal(jax.random.key(9), (2, 9, 20))

    def value_and_grads(params, x):
        run = lambda params, x: nnx.merge(graphdef, params)(x, jax.random.key(8))
        y, vjp = jax.vjp(run, params, x)
        return y, *vjp(g)

    (y, dparams, dx), (want_y, want_dparams, want_dx) = _in_both(
        monkeypatch, value_and_grads, params, x
    )
    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    hlo = jax.jit(value_and_grads).lower(params, x).as_text()
    assert hlo.count("ftlib_sgemm_acc") == (2 if rate == 0 else 1)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(dparams), jax.tree.leaves(want_dparams)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_mkl
def test_lora_linear_accumulated_product_drops_the_frozen_kernels_gradient(monkeypatch):
    """Differentiated w.r.t. the factors only (the base frozen, as the train step does),
    the compiled step has one MKL product fewer: XLA drops the base kernel's dW."""
    from flax import nnx

    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    layer = _lora_layer()
    x = jax.random.normal(jax.random.key(7), (2, 9, 12))

    def products(trainable):
        graphdef, params, rest = nnx.split(layer, trainable, ...)
        loss = lambda params: jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x)))
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text().count('"ftlib_sgemm"')

    factors = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("lora_a"), nnx.PathContains("lora_b")))
    assert products(factors) == products(nnx.Param) - 1


@needs_mkl
def test_lora_linear_accumulates_in_the_layers_compute_dtype(monkeypatch):
    """The accumulated product runs on the cast operands, as Linear does: a base kernel
    stored in bf16 (model.frozen_dtype) under fp32 compute takes it, while bf16 compute
    keeps XLA's products and returns bf16."""
    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    x = jax.random.normal(jax.random.key(7), (2, 9, 12))
    for base_dtype, compute_dtype, accumulated in (
        (jnp.bfloat16, jnp.float32, True),
        (jnp.float32, jnp.bfloat16, False),
    ):
        layer = _lora_layer(base_dtype=base_dtype, compute_dtype=compute_dtype)
        assert layer(x).dtype == compute_dtype
        hlo = jax.jit(lambda x: layer(x)).lower(x).as_text()
        assert ("ftlib_sgemm_acc" in hlo) == accumulated


@needs_mkl
def test_causal_attention_matches_xla(monkeypatch):
    from ftlib.models.attention import causal_attention

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 16, 4, 8), dtype=np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8), dtype=np.float32)) for _ in "kv")
    g = jnp.asarray(rng.standard_normal((2, 16, 4, 8), dtype=np.float32))

    def value_and_grads(q, k, v):
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), (2, 16, 16))
        y, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, mask, 4), q, k, v)
        return (y, *vjp(g))

    for got, want in zip(*_in_both(monkeypatch, value_and_grads, q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("projection", ["matmul", "lora"])
def test_swiglu_product_matches_swiglu_then_the_projection(monkeypatch, projection):
    """The MLP's path on the CPU kernels (h = swiglu(gate, up) recomputed in SwiGLU's
    backward kernel for the projection's parameter gradients), down_proj plain or LoRA's,
    against swiglu, then the projection by XLA's autodiff."""
    from ftlib.models.layers import swiglu
    from ftlib.models.products import MatmulProduct, swiglu_product, swiglu_product_applies
    from ftlib.peft.lora import AccumulatedProduct

    rng = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    gate, up = 3 * normal(2, 9, 24), 3 * normal(2, 9, 24)
    g = normal(2, 9, 16)
    if projection == "matmul":
        product, params = MatmulProduct(), (normal(24, 16),)
        plain = lambda h, p: h @ p[0]  # noqa: E731
    else:
        product, params = AccumulatedProduct(2.0), (normal(24, 16), normal(4, 24), normal(4, 16))
        plain = lambda h, p: h @ p[0] + 2.0 * (h @ p[1].T) @ p[2]  # noqa: E731
    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    assert swiglu_product_applies(gate, up, params)

    def value_and_grads(gate, up, params):
        if swiglu_product_applies(gate, up, params):
            fn = lambda gate, up, p: swiglu_product(product, gate, up, p)  # noqa: E731
        else:
            fn = lambda gate, up, p: plain(swiglu(gate, up), p)  # noqa: E731
        y, vjp = jax.vjp(fn, gate, up, params)
        dgate, dup, dparams = vjp(g)
        return (y, dgate, dup, *dparams)

    names = ("y", "dgate", "dup", "dw", "da", "db")
    for name, got, want in zip(
        names, *_in_both(monkeypatch, value_and_grads, gate, up, params), strict=False
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


@needs_mkl
def test_shared_input_products_match_separate_projections(monkeypatch):
    """q, k, v-like projections of one input (plain and LoRA's) as one custom VJP, x
    saved once and its gradient summed in one buffer, against XLA's autodiff."""
    from ftlib.models.products import MatmulProduct, shared_input_applies, shared_input_products
    from ftlib.peft.lora import AccumulatedProduct

    rng = np.random.default_rng(6)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    x = normal(2, 9, 24)
    params = ((normal(24, 16),), (normal(24, 16), normal(4, 24), normal(4, 16)), (normal(24, 8),))
    products = (MatmulProduct(), AccumulatedProduct(2.0), MatmulProduct())
    gs = [normal(2, 9, 16), normal(2, 9, 16), normal(2, 9, 8)]

    def plain(x, ps):
        (w1,), (w2, a, b), (w3,) = ps
        return [x @ w1, x @ w2 + 2.0 * (x @ a.T) @ b, x @ w3]

    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    assert shared_input_applies(x, params)

    def value_and_grads(x, params):
        fn = plain
        if shared_input_applies(x, params):
            fn = lambda x, ps: shared_input_products(products, x, ps)  # noqa: E731
        ys, vjp = jax.vjp(fn, x, params)
        return ys, *vjp(gs)

    got, want = _in_both(monkeypatch, value_and_grads, x, params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


@needs_mkl
@pytest.mark.parametrize(
    "method, scan_layers",
    [("full", True), ("full", False), ("prefix", True), ("lora", True), ("lora_dropout", True)],
)
def test_llama_layers_share_and_recompute_saved_inputs(monkeypatch, method, scan_layers):
    """Where the projections are plain Linears (full fine-tuning, prefix tuning) or LoRA
    without dropout, q, k, v (o alone) and gate, up run as products sharing their input, and the
    compiled train step recomputes h in SwiGLU's backward kernel (once in the scan's
    body, in each branch of its backward; once per layer in the loop); with the base frozen (prefix, LoRA) it drops
    down_proj's weight gradient. LoRA with dropout keeps each module's own call. (Losses against XLA's ops:
    test_tiny_training_run_logs_the_same_losses_with_either_products.)"""
    import dataclasses

    import optax
    import tiny_llama
    from flax import nnx

    from configs import default
    from ftlib import peft, steps
    from ftlib.models.llama import Llama

    monkeypatch.setenv("FTLIB_CPU_GEMM", "mkl")
    cfg = dataclasses.replace(tiny_llama.CFG, scan_layers=scan_layers)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    peft_cfg = default.get_config().peft
    peft_cfg.method = method.removesuffix("_dropout")
    peft_cfg.lora.dropout = 0.1 if method == "lora_dropout" else 0.0
    tx = optax.adamw(1e-3)
    graphdef, state, frozen = steps.init_train_state(model, peft.apply_method(model, peft_cfg), tx)
    step = jax.jit(steps.make_train_step(graphdef, tx))
    batch = tiny_llama.batch(0, cfg, B=2, T=8)
    hlo = step.lower(state, frozen, batch).compile().as_text()
    calls = 0 if method == "lora_dropout" else (1 if scan_layers else cfg.num_layers)
    # q, k, v; o; gate, up: each group one custom VJP saving its input once.
    jaxpr = str(jax.make_jaxpr(lambda b: steps._hidden(model, b, jax.random.key(0)))(batch))
    assert jaxpr.count("name=shared_input_products") == 3 * calls
    # Where nothing below the layers trains (prefix, LoRA), the scan's backward has two
    # branches, layer 0's without its input gradient (ftlib.models.layer_stack).
    branches = 2 if scan_layers and method != "full" else 1
    assert hlo.count('"ftlib_swiglu_backward_h"') == calls * branches
    assert ('"ftlib_swiglu_backward"' in hlo) == (method == "lora_dropout")
    down_dw = f"f32[{cfg.intermediate_size},{cfg.hidden_size}]{{1,0}} custom-call"  # h^T g
    assert (down_dw in hlo) == (method == "full")
