"""Masks and LoRA: frozen leaves bit-identical after training, adapters change,
optimizer state only for trainable leaves, analytic trainable counts, identity
at init, and the user errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny_llama import CFG, batch

from ftlib import masks, optim, peft, steps
from ftlib.errors import FtlibError
from ftlib.models.llama import Llama

PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def peft_cfg(method="lora", target=r".*/(q|k|v|o|gate|up|down)_proj", rank=4, **kw):
    c = ml_collections.ConfigDict(
        dict(
            method=method,
            freeze=(),
            trainable=(),
            lora=dict(rank=rank, alpha=8.0, dropout=0.0, rslora=False, target_modules=target),
        )
    )
    c.update(kw)
    return c


def optim_cfg():
    return ml_collections.ConfigDict(
        dict(
            learning_rate=1e-2,
            warmup_steps=1,
            end_lr_ratio=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            no_decay=r".*(scale|bias)",
            grad_clip_norm=1.0,
            grad_accum_steps=1,
        )
    )


def lora_count(cfg, r):
    """r * (d_in + d_out) per adapted projection per layer."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    dims = {
        "q": (d, q),
        "k": (d, kv),
        "v": (d, kv),
        "o": (q, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }
    return cfg.num_layers * sum(r * (a + b) for a, b in dims.values())


def train(model, mask, n_steps=3):
    tx = optim.make_optimizer(optim_cfg(), 10)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx))
    for i in range(n_steps):
        state, _ = step(state, frozen, batch(i))
    return state, frozen


def flat(state):
    return {masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_lora_trains_only_adapters():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    before = flat(nnx.state(model, nnx.Param))
    mask = peft.apply_method(model, peft_cfg())
    state, frozen = train(model, mask)
    after_frozen, after_train = flat(frozen), flat(state.params)
    # Every base param is frozen and bit-identical (it moved under .../base/...).
    assert len(after_frozen) == len(before)
    for path, value in after_frozen.items():
        np.testing.assert_array_equal(value, before[path.replace("/base/", "/")])
    assert set(after_train) == {
        f"blocks/{m}/{p}_proj/lora_{ab}"
        for p in PROJ
        for ab in "ab"
        for m in ["attn" if p in "qkvo" else "mlp"]
    }
    for path, value in after_train.items():
        if path.endswith("lora_b"):
            assert np.abs(value).max() > 0, f"{path} did not change from its zero init"


def test_optimizer_state_only_for_trainable():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg())
    state, _ = train(model, mask, n_steps=1)
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    # AdamW keeps mu and nu per trainable leaf and nothing for frozen ones.
    assert sum(x.size for x in opt_leaves) == 2 * mask.count(True)


@pytest.mark.parametrize(
    "rank,target,expected_modules",
    [
        (4, r".*/(q|k|v|o|gate|up|down)_proj", PROJ),
        (2, r".*/(q|v)_proj", ("q", "v")),
    ],
)
def test_trainable_count_is_analytic(rank, target, expected_modules):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg(rank=rank, target=target))
    full = lora_count(CFG, rank)
    if expected_modules == ("q", "v"):
        d, q, kv = CFG.hidden_size, CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
        full = CFG.num_layers * rank * ((d + q) + (d + kv))
    assert mask.count(True) == full
    assert mask.count() == CFG.param_count() + full
    assert f"trainable {full:,} / total" in mask.table()


def test_lora_is_identity_at_init_and_merges():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(batch()["input_ids"])
    base_logits = model(ids)
    peft.apply_method(model, peft_cfg())
    np.testing.assert_array_equal(model(ids), base_logits)
    q = model.blocks.attn.q_proj
    q.lora_b[...] = jax.random.normal(jax.random.key(1), q.lora_b.shape)
    x = jax.random.normal(jax.random.key(2), (3, CFG.hidden_size))
    # Per layer: merged kernel applied to x equals base + adapter path.
    merged = q.merged_kernel()
    for layer in range(CFG.num_layers):
        layer_q = jax.tree.map(lambda v: v[layer], nnx.state(q))
        sliced = nnx.merge(nnx.graphdef(q), layer_q)
        np.testing.assert_allclose(sliced(x), x @ merged[layer], atol=1e-5)


def test_full_with_freeze_rule():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg("full", freeze=("embed/.*",)))
    assert mask.count(True) == CFG.param_count() - CFG.vocab_size * CFG.hidden_size
    emb = np.asarray(model.embed.embedding[...])
    state, frozen = train(model, mask)
    np.testing.assert_array_equal(flat(frozen)["embed/embedding"], emb)


def test_user_errors():
    with pytest.raises(FtlibError, match="unknown peft.method 'lorra'; known: .*full, .*lora"):
        peft.apply_method(Llama(CFG, rngs=nnx.Rngs(0)), peft_cfg("lorra"))
    with pytest.raises(FtlibError, match="target regex '.*/qq_proj' matches no Linear"):
        peft.apply_method(Llama(CFG, rngs=nnx.Rngs(0)), peft_cfg(target=".*/qq_proj"))
    with pytest.raises(FtlibError, match="no trainable/freeze rule covers param embed/embedding"):
        masks.build_mask(Llama(CFG, rngs=nnx.Rngs(0)), [("blocks/.*", True)])
    with pytest.raises(FtlibError, match="freezes every param"):
        peft.apply_method(Llama(CFG, rngs=nnx.Rngs(0)), peft_cfg("full", freeze=(".*",)))


def test_weight_decay_mask_skips_norms():
    params = {"blocks": {"attn_norm": {"scale": jnp.ones(3)}, "q": {"kernel": jnp.ones((2, 2))}}}
    decay = optim.decay_mask(r".*(scale|bias)")(params)
    assert decay == {"blocks": {"attn_norm": {"scale": False}, "q": {"kernel": True}}}
