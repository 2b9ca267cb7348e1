"""Guarantees every PEFT method keeps, on a tiny Llama: identity at init, frozen
leaves bit-identical after training with the one train step, an analytic
trainable count, optimizer state only for trainable leaves, adapter files that
hold only trainable leaves and reproduce the fine-tuned model, merge/unmerge,
and clear errors for bad input.

A method joins the table by one CASES entry."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_llama
from flax import nnx
from tiny_llama import batch

from configs import default, tiny
from ftlib import adapters, masks, optim, peft, steps, sweep
from ftlib.errors import FtlibError
from ftlib.models.layers import Linear
from ftlib.models.llama import Llama, LlamaConfig
from ftlib.peft.dora import DoRALinear
from ftlib.peft.merging import is_mergeable

# Same stacked params as a scan; eager forwards then reuse per-op compiles across
# methods, where a jitted scan recompiles per model (~5 s each on CPU).
CFG = dataclasses.replace(tiny_llama.CFG, scan_layers=False)
CFG_BIAS = dataclasses.replace(CFG, attention_bias=True)  # q/k/v biases (Qwen2-style)
RANK, BOTTLENECK = 4, 4


def dims(cfg):
    """Projection -> (d_in, d_out)."""
    d, f, q, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    return dict(q=(d, q), k=(d, kv), v=(d, kv), o=(q, d), gate=(d, f), up=(d, f), down=(f, d))


def lora_count(cfg, projs="q k v o gate up down"):
    """A [r, d_in] + B [r, d_out] per adapted projection and layer."""
    return cfg.num_layers * sum(RANK * sum(dims(cfg)[p]) for p in projs.split())


def dora_count(cfg):
    """LoRA + one magnitude per output feature."""
    return lora_count(cfg) + cfg.num_layers * sum(o for _, o in dims(cfg).values())


def ia3_count(cfg):
    """Outputs of k and v, input of down (the FFN intermediate)."""
    return cfg.num_layers * (dims(cfg)["k"][1] + dims(cfg)["v"][1] + cfg.intermediate_size)


def adapter_count(cfg, sites):
    """down [d, b] + bias [b] + up [b, d] + bias [d] per site and layer."""
    d = cfg.hidden_size
    return cfg.num_layers * sites * (2 * d * BOTTLENECK + BOTTLENECK + d)


def bitfit_bias_count(cfg):
    return cfg.num_layers * sum(dims(cfg)[p][1] for p in "qkv")


def norm_count(cfg):
    """attn_norm and mlp_norm per layer + final_norm."""
    return (2 * cfg.num_layers + 1) * cfg.hidden_size


@dataclasses.dataclass(frozen=True)
class Case:
    method: str  # peft.method
    overrides: dict  # flattened peft config overrides, e.g. {'lora.rank': 4}
    count: Callable[[LlamaConfig], int]  # analytic trainable count
    added: bool  # surgery adds the trainable params (else they are base params)
    identity_at_init: bool
    mergeable: bool
    model: LlamaConfig = CFG
    # Its training tests (a train-step compile, ~7 s CPU each) only run with -m slow;
    # set for variants of a case whose training the default suite already covers.
    slow_training: bool = False


CASES = {
    "lora": Case("lora", {"lora.rank": RANK}, lora_count, True, True, True),
    # DoRA and IA3 on a model with biases: merges must carry the bias correctly.
    "dora": Case("dora", {"dora.rank": RANK}, dora_count, True, True, True, CFG_BIAS),
    "ia3": Case("ia3", {}, ia3_count, True, True, True, CFG_BIAS),
    "adapter_houlsby": Case(
        "adapter",
        {"adapter.bottleneck": BOTTLENECK},
        lambda c: adapter_count(c, 2),
        True,
        True,
        False,
    ),
    "adapter_pfeiffer": Case(
        "adapter",
        {"adapter.bottleneck": BOTTLENECK, "adapter.placement": "pfeiffer"},
        lambda c: adapter_count(c, 1),
        True,
        True,
        False,
        slow_training=True,
    ),
    "bitfit": Case(
        "bitfit", {}, bitfit_bias_count, False, True, False, CFG_BIAS, slow_training=True
    ),
    "bitfit_norms": Case(
        "bitfit", {"bitfit.include_norms": True}, norm_count, False, True, False, slow_training=True
    ),
    # Composition: a param trains if any method's rules say so.
    "lora+ia3": Case(
        "lora+ia3",
        {"lora.rank": RANK, "lora.target_modules": r".*/(q|o)_proj"},
        lambda c: lora_count(c, "q o") + ia3_count(c),
        True,
        True,
        True,
        slow_training=True,
    ),
    # A wrapper method with an input hook: soft tokens change the logits from the start.
    "lora+prompt": Case(
        "lora+prompt",
        {"lora.rank": RANK, "prompt.num_virtual_tokens": 3},
        lambda c: lora_count(c) + 3 * c.hidden_size,
        True,
        False,
        False,
        slow_training=True,
    ),
    # Virtual tokens (3) change the logits by design; tests/test_prefix_prompt.py has the rest.
    "prefix": Case(
        "prefix",
        {"prefix.num_virtual_tokens": 3},
        lambda c: c.num_layers * 3 * 2 * c.num_kv_heads * c.head_dim,
        True,
        False,
        False,
    ),
    "prefix_projection": Case(
        "prefix",
        {"prefix.num_virtual_tokens": 3, "prefix.projection": True},
        # embedding [3, KH], Linear KH -> KH, per layer Linear KH -> key and value
        lambda c: (
            (kh := c.num_kv_heads * c.head_dim) * (3 + kh + 1) + c.num_layers * 2 * kh * (kh + 1)
        ),
        True,
        False,
        False,
        slow_training=True,
    ),
    "prompt": Case(
        "prompt",
        {"prompt.num_virtual_tokens": 3},
        lambda c: 3 * c.hidden_size,
        True,
        False,
        False,
        slow_training=True,
    ),
}


def peft_cfg(method, overrides=()):
    c = default.get_config().peft
    c.method = method
    for key, value in dict(overrides).items():
        block, name = key.split(".")
        c[block][name] = value
    return c


def optim_cfg():
    c = default.get_config().optim
    c.learning_rate, c.warmup_steps = 1e-2, 1
    return c


IDS = jnp.asarray(batch(99)["input_ids"])


def logits(model):
    return model(IDS)


def flat(state):
    return {masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def surgery(case, seed=0, base_seed=0):
    model = Llama(case.model, rngs=nnx.Rngs(base_seed))
    mask = peft.apply_method(model, peft_cfg(case.method, case.overrides), seed)
    return model, mask


@functools.cache
def trained(name, data_seed=0, n_steps=3):
    """(graphdef, state, frozen, mask, params right after surgery, tx), trained with
    the jitted train step every method shares (one compile per case)."""
    model, mask = surgery(CASES[name])
    initial = flat(nnx.state(model, nnx.Param))
    tx, step = _step(name)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    for i in range(n_steps):
        state, _ = step(state, frozen, batch(data_seed + i, CASES[name].model))
    return graphdef, state, frozen, mask, initial, tx


@functools.cache
def _step(name):
    """One jitted step per case, so runs on other data reuse its compile."""
    model, mask = surgery(CASES[name])
    tx = optim.make_optimizer(optim_cfg(), 10)
    graphdef = nnx.split(model, mask.filter, ...)[0]
    return tx, jax.jit(steps.make_train_step(graphdef, tx))


def fine_tuned(name, **kw):
    """A fresh copy (nnx.merge alone would share Variables with the cached state)."""
    graphdef, state, frozen, *_ = trained(name, **kw)
    return nnx.clone(nnx.merge(graphdef, state.params, frozen))


def trained_cases(keep=lambda case: True):
    return [
        pytest.param(n, marks=[pytest.mark.slow] if c.slow_training else [])
        for n, c in CASES.items()
        if keep(c)
    ]


IDENTITY = [n for n, c in CASES.items() if c.identity_at_init]
TRAINED = trained_cases()
MERGEABLE = trained_cases(lambda c: c.mergeable)


@pytest.mark.parametrize("name", IDENTITY)
def test_identity_at_init(name):
    case = CASES[name]
    base = logits(Llama(case.model, rngs=nnx.Rngs(0)))
    model, _ = surgery(case)
    np.testing.assert_allclose(logits(model), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TRAINED)
def test_trains_only_trainable_leaves(name):
    _, state, frozen, mask, initial, _ = trained(name)
    after_frozen, after_train = flat(frozen), flat(state.params)
    assert set(after_train) == {p for p, t in mask.trainable.items() if t}
    for path, value in after_frozen.items():
        np.testing.assert_array_equal(value, initial[path], err_msg=path)
    for path, value in after_train.items():
        assert np.any(value != initial[path]), f"{path} did not change"


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_count_and_optimizer_state(name):
    case = CASES[name]
    model, mask = surgery(case)
    expected = case.count(case.model)
    assert mask.count(True) == expected
    assert mask.count() == case.model.param_count() + (expected if case.added else 0)
    _, state, _ = steps.init_train_state(model, mask, optim.make_optimizer(optim_cfg(), 10))
    # AdamW keeps mu and nu per trainable leaf and nothing for frozen ones.
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in opt_leaves) == 2 * expected


@pytest.mark.parametrize("name", TRAINED)
def test_adapter_file_reproduces_fine_tuned_model(name, tmp_path):
    case = CASES[name]
    _, state, frozen, mask, _, _ = trained(name)
    cfg = peft_cfg(case.method, case.overrides)
    adapters.save_adapter(tmp_path, state.params, cfg, adapters.base_fingerprint(frozen))
    size = os.path.getsize(tmp_path / adapters.WEIGHTS)
    # fp32 leaves + the safetensors JSON header (a line per leaf).
    assert 4 * mask.count(True) < size < 4 * mask.count(True) + 200 * len(flat(state.params))
    model, _ = surgery(case, seed=7)  # other adapter init: values must come from the file
    adapters.load_adapter(model, tmp_path, cfg)
    np.testing.assert_array_equal(logits(model), logits(fine_tuned(name)))


def test_two_adapters_swap_on_one_base(tmp_path):
    case = CASES["lora"]
    cfg = peft_cfg(case.method, case.overrides)
    expected = {}
    for data_seed in (0, 10):
        _, state, frozen, *_ = trained("lora", data_seed=data_seed)
        path = tmp_path / str(data_seed)
        adapters.save_adapter(path, state.params, cfg, adapters.base_fingerprint(frozen))
        expected[path] = logits(fine_tuned("lora", data_seed=data_seed))
    a, b = expected
    assert np.abs(expected[a] - expected[b]).max() > 1e-4  # two different fine-tunes
    model, _ = surgery(case, seed=3)
    for path in (a, b, a):
        adapters.load_adapter(model, path, cfg)
        np.testing.assert_array_equal(logits(model), expected[path])


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unmerge(name):
    model = fine_tuned(name)
    before_params, before = flat(nnx.state(model, nnx.Param)), logits(model)
    wrappers = peft.merge(model)
    assert wrappers and not any(is_mergeable(m) for _, m in nnx.iter_modules(model))
    np.testing.assert_allclose(logits(model), before, atol=1e-5, rtol=0)
    peft.unmerge(model, wrappers)
    after = flat(nnx.state(model, nnx.Param))
    assert set(after) == set(before_params)
    for path, value in after.items():
        np.testing.assert_allclose(value, before_params[path], atol=1e-5, rtol=0, err_msg=path)
    np.testing.assert_allclose(logits(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "method,overrides,message",
    [
        ("lora+lorra", {}, r"unknown peft.method 'lorra'; known: .*\(join several with '\+'"),
        ("lora+lora", {}, "names a method twice"),
        ("adapter", {"adapter.mlp_output": ".*/nope"}, "target regex '.*/nope' matches no Linear"),
        ("adapter", {"adapter.placement": "middle"}, "peft.adapter.placement 'middle'"),
        ("ia3", {"ia3.feedforward_modules": ".*/up_proj"}, "must be a subset of .*up_proj"),
        ("bitfit", {}, "no bias params .*peft.bitfit.include_norms=True"),
        (
            "lora+ia3",
            {"lora.target_modules": r".*/(q|k)_proj"},
            r"blocks/attn/k_proj is already adapted \(LoRALinear\)",
        ),
    ],
)
def test_bad_method_options(method, overrides, message):
    with pytest.raises(FtlibError, match=message):
        _model_with(peft_cfg(method, overrides))


def test_config_blocks_must_fit_the_methods(tmp_path):
    cfg = peft_cfg("dora")
    del cfg["dora"]
    with pytest.raises(FtlibError, match="includes 'dora' but config.peft has no 'dora' block"):
        peft.check_config(cfg)
    cfg = peft_cfg("lora")
    cfg.lora.rnak = 2
    with pytest.raises(FtlibError, match=r"peft.lora has unknown options \['rnak'\]"):
        peft.check_config(cfg)
    overrides = {"peft.lora.rank": 2, "optim.learning_rate": 1.0}
    peft.check_config(peft_cfg("lora+prompt"), ["peft.prompt.num_virtual_tokens", *overrides])
    with pytest.raises(FtlibError, match="peft.dora.rank has no effect: .* 'lora\\+dora'"):
        peft.check_config(peft_cfg("lora"), ["peft.dora.rank", *overrides])
    sweep_runs = [{"seed": 1}, {"peft.dora.rank": 4}]  # tiny's method: full
    with pytest.raises(FtlibError, match="peft.dora.rank has no effect: peft.method 'full'"):
        sweep.run_sweep(tiny.get_config(), sweep_runs, str(tmp_path))
    assert not list(tmp_path.iterdir())  # refused before any run


def test_load_adapter_refuses_other_method_or_base(tmp_path):
    _, state, frozen, *_ = trained("lora")
    cfg = peft_cfg("lora", CASES["lora"].overrides)
    adapters.save_adapter(tmp_path, state.params, cfg, adapters.base_fingerprint(frozen))
    dora, _ = surgery(CASES["dora"])
    with pytest.raises(FtlibError, match="made with peft.method 'lora', this model with 'dora'"):
        adapters.load_adapter(dora, tmp_path, peft_cfg("dora", CASES["dora"].overrides))
    rank2 = peft_cfg("lora", {"lora.rank": 2})
    with pytest.raises(FtlibError, match=r"holds blocks/attn/k_proj/lora_a \[2, 4, 32\]"):
        adapters.load_adapter(_model_with(rank2), tmp_path, rank2)
    with pytest.raises(FtlibError, match="another base model \\(same shapes, different weights"):
        adapters.load_adapter(_model_with(cfg, base_seed=1), tmp_path, cfg)
    wide = dataclasses.replace(CFG, intermediate_size=64)
    with pytest.raises(FtlibError, match="another base model \\(param blocks/mlp/down_proj/base"):
        adapters.load_adapter(_model_with(cfg, wide), tmp_path, cfg)


def test_dora_matches_the_paper_with_a_detached_norm():
    base = Linear(6, 5, ("embed", "mlp"), rngs=nnx.Rngs(0), use_bias=True)
    base.bias[...] = jnp.arange(5.0)
    layer = DoRALinear(base, rank=2, alpha=4.0, dropout=0.0, rslora=False, rngs=nnx.Rngs(1))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 5))
    layer.lora_magnitude[...] = layer.lora_magnitude[...] * 1.5
    x = jax.random.normal(jax.random.key(3), (3, 6))

    def reference(b, detach):
        v = base.kernel[...] + 2.0 * layer.lora_a[...].T @ b
        norm = jnp.linalg.norm(v, axis=0)
        norm = jax.lax.stop_gradient(norm) if detach else norm
        return layer.lora_magnitude[...] * (x @ v) / norm + base.bias[...]

    graphdef, state = nnx.split(layer)

    def ours(b):
        state_b = jax.tree.map(lambda v: v, state)  # fresh Variables, settable under grad
        state_b["lora_b"].set_value(b)
        return nnx.merge(graphdef, state_b)(x)

    b = layer.lora_b[...]
    np.testing.assert_allclose(ours(b), reference(b, True), atol=1e-5)
    grad = lambda f: jax.grad(lambda b: jnp.sum(jnp.sin(f(b))))(b)
    np.testing.assert_allclose(grad(ours), grad(lambda b: reference(b, True)), atol=1e-5)
    assert np.abs(grad(ours) - grad(lambda b: reference(b, False))).max() > 1e-3


def _model_with(cfg, model_cfg=CFG, base_seed=0):
    model = Llama(model_cfg, rngs=nnx.Rngs(base_seed))
    peft.apply_method(model, cfg)
    return model
