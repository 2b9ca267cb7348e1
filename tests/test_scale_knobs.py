"""Memory and speed knobs change cost, not results: remat policies, scan vs a
Python loop over layers and scan unrolling give the same step (loss and updated
params); bf16 compute and a bf16-stored frozen base keep fp32 trainable params
and stay close to fp32."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
import tiny_llama
from flax import nnx
from tiny_llama import batch

from configs import default
from ftlib import masks, peft, steps
from ftlib.models.llama import Llama

CFG = dataclasses.replace(tiny_llama.CFG, num_layers=4)
KNOBS = {
    "loop": dict(scan_layers=False),
    "unroll2": dict(scan_unroll=2),
    "remat_full": dict(remat="full"),
    "remat_save_dots": dict(remat="save_dots"),
}


@functools.cache
def one_step(method, frozen_dtype="", **overrides):
    model = Llama(dataclasses.replace(CFG, **overrides), rngs=nnx.Rngs(0))
    c = default.get_config()
    c.peft.method = method
    c.peft.lora.target_modules = r".*/(q|v|down)_proj"
    mask = peft.apply_method(model, c.peft)
    # Plain SGD: updated params differ exactly as the grads do (Adam's first step,
    # ~lr * sign(g), would blow 1e-9 grads' rounding noise up to lr).
    tx = optax.sgd(0.1)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx, frozen_dtype)
    frozen_dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(frozen)}
    state, metrics = jax.jit(steps.make_train_step(graphdef, tx))(state, frozen, batch(0, CFG))
    params = {masks.path_str(p): v[...] for p, v in nnx.to_flat_state(state.params)}
    return float(metrics["loss"]), float(metrics["grad_norm"]), params, frozen_dtypes


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_knob_gives_the_same_step(method, knob):
    loss, grad_norm, params, _ = one_step(method)
    k_loss, k_grad_norm, k_params, _ = one_step(method, **KNOBS[knob])
    np.testing.assert_allclose(k_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(k_grad_norm, grad_norm, rtol=1e-5)
    for path, value in params.items():
        np.testing.assert_allclose(k_params[path], value, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_compute_keeps_fp32_params(method):
    loss, _, params, _ = one_step(method)
    b_loss, b_grad_norm, b_params, _ = one_step(method, dtype="bfloat16")
    assert np.isfinite(b_grad_norm)
    assert abs(b_loss - loss) < 0.02 * loss
    assert {v.dtype for v in b_params.values()} == {np.dtype("float32")}
    assert b_params.keys() == params.keys()


def test_frozen_base_in_bf16():
    """LoRA with the frozen base stored in bf16: half its memory, fp32 adapters,
    nearly the fp32 step."""
    loss, _, params, frozen_dtypes = one_step("lora")
    b_loss, _, b_params, b_frozen_dtypes = one_step("lora", frozen_dtype="bfloat16")
    assert frozen_dtypes == {np.dtype("float32")}
    assert b_frozen_dtypes == {np.dtype(jax.numpy.bfloat16)}
    assert {v.dtype for v in b_params.values()} == {np.dtype("float32")}
    assert abs(b_loss - loss) < 0.01 * loss
