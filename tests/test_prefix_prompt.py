"""Prefix and prompt tuning: a prefix made of a text's own keys/values (a soft
prompt made of its embeddings) reproduces the model run on text + input, packed
segments stay isolated, the projection MLP folds exactly, PEFT's prefix layout,
analytic trainable counts, frozen leaves bit-identical after jitted train steps,
and the user errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_llama
from flax import nnx

from configs import default
from ftlib import masks, optim, peft, sharding, steps
from ftlib.errors import FtlibError
from ftlib.models.llama import Llama
from ftlib.peft import prefix

CFG = dataclasses.replace(tiny_llama.CFG, rope_theta=500.0)


def peft_cfg(method, n=3, **options):
    c = default.get_config().peft
    c.method = method
    c[method].num_virtual_tokens = n
    c[method].update(options)
    return c


@nnx.jit
def run(model, ids_BT, positions_BT=None, segment_ids_BT=None):
    # Jitted: an eager call of the scanned model re-traces its scan (seconds each).
    return model(ids_BT, positions_BT, segment_ids_BT)


def ids(seed, n, B=None):
    shape = (n,) if B is None else (B, n)
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape))


def test_prefix_of_text_keys_equals_running_on_text_then_input():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    x, y = ids(1, 4), ids(2, 6)
    want = run(model, jnp.concatenate([x, y])[None])[0, 4:]
    # The base model's cached keys (RoPE'd at positions 0..3) and values of x.
    _, cache = model.prefill(x[None], extra_slots=1)
    k_LPKH, v_LPKH = cache.k_LBSKH[:, 0, :4], cache.v_LBSKH[:, 0, :4]
    peft.apply_method(model, peft_cfg("prefix", n=4))
    assert not np.allclose(
        run(model, y[None])[0], want, atol=1e-3
    )  # random init: a different model
    model.prefix.key[...] = k_LPKH.reshape(2, 4, 16)
    model.prefix.value[...] = v_LPKH.reshape(2, 4, 16)
    # Real tokens start at position P, so this is exactly the model on x + y.
    np.testing.assert_allclose(run(model, y[None])[0], want, atol=1e-5)


def test_prefix_init_from_token_ids_is_the_model_reading_them_first():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    x, y = ids(1, 2), ids(2, 6)
    x4 = jnp.concatenate([x, x])  # two ids for P=4 virtual tokens: repeated
    want = run(model, jnp.concatenate([x4, y])[None])[0, 4:]
    peft.apply_method(model, peft_cfg("prefix", n=4, init_token_ids=tuple(int(i) for i in x)))
    np.testing.assert_allclose(run(model, y[None])[0], want, atol=1e-5)


def test_prompt_of_text_embeddings_equals_running_on_text_then_input():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    x, y = ids(1, 5), ids(2, 6)
    want = run(model, jnp.concatenate([x, y])[None])[0, 5:]
    peft.apply_method(model, peft_cfg("prompt", n=5, init_token_ids=tuple(int(i) for i in x)))
    np.testing.assert_allclose(run(model, y[None])[0], want, atol=1e-5)
    model.prompt.embedding[...] = model.prompt.embedding[...] + 0.1
    assert not np.allclose(run(model, y[None])[0], want, atol=1e-3)


def test_prompt_init_from_ids_repeats_and_random_init_uses_vocab_rows():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    peft.apply_method(model, peft_cfg("prompt", n=5, init_token_ids=(7, 9)))
    table = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(model.prompt.embedding[...], table[[7, 9, 7, 9, 7]])
    model = Llama(CFG, rngs=nnx.Rngs(0))
    peft.apply_method(model, peft_cfg("prompt", n=5))
    soft = np.asarray(model.prompt.embedding[...])
    assert all((np.abs(table - row).max(axis=1) == 0).any() for row in soft)


def test_prompt_init_from_text_uses_its_tokens():
    def tokenizer(text, add_special_tokens=True):  # one token per word: 'a' -> 1, 'b' -> 2, ...
        assert not add_special_tokens  # PEFT's TEXT init tokenizes without BOS/EOS
        return {"input_ids": [ord(w) - ord("a") + 1 for w in text.split()]}

    c = peft_cfg("prompt", n=4, init_text="c a d")
    peft.resolve_init_texts(c, tokenizer)
    assert tuple(c.prompt.init_token_ids) == (3, 1, 4)
    model = Llama(CFG, rngs=nnx.Rngs(0))
    peft.apply_method(model, c)
    table = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(model.prompt.embedding[...], table[[3, 1, 4, 3]])
    peft.resolve_init_texts(c, tokenizer)  # a resolved config (e.g. config.json) stays valid
    with pytest.raises(FtlibError, match="peft.prompt.init_text and .* disagree"):
        peft.resolve_init_texts(peft_cfg("prompt", init_text="a", init_token_ids=(5,)), tokenizer)
    with pytest.raises(FtlibError, match="peft.prompt.init_text is tokenized by the trainer"):
        peft.apply_method(Llama(CFG, rngs=nnx.Rngs(0)), peft_cfg("prompt", init_text="a b"))
    # The prefix's init_text resolves the same way; the prompt block is left alone.
    c = peft_cfg("prefix", n=4, init_text="b b")
    peft.resolve_init_texts(c, tokenizer)
    assert tuple(c.prefix.init_token_ids) == (2, 2) and not c.prompt.init_token_ids
    with pytest.raises(FtlibError, match="peft.prefix.init_text is tokenized by the trainer"):
        peft.apply_method(Llama(CFG, rngs=nnx.Rngs(0)), peft_cfg("prefix", init_text="a b"))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packed_segments_and_padding_stay_isolated(method):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    peft.apply_method(model, peft_cfg(method, n=3))
    a, b = ids(3, 5), ids(4, 4)
    packed = jnp.concatenate([a, b, jnp.zeros(3, a.dtype)])[None]
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
    pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3])
    out = run(model, packed, pos, seg)[0]
    np.testing.assert_allclose(out[:5], run(model, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[5:9], run(model, b[None])[0], atol=1e-5)


def test_projection_mlp_folds_to_the_same_prefix():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    peft.apply_method(model, peft_cfg("prefix", n=3, projection=True, projection_hidden=12))
    batch = ids(5, 7, B=2)
    unfolded = run(model, batch)
    prefix.fold(model)
    assert isinstance(model.prefix, prefix.Prefix)
    np.testing.assert_allclose(run(model, batch), unfolded, atol=1e-6)


def test_peft_prefix_layout():
    """PEFT's get_prompt views prompt_embeddings [P, L*2*K*H] as [P, L*2, K, H],
    permutes to [L*2, K, P, H] and takes (key, value) pairs per layer."""
    k_LPKH, v_LPKH = jax.random.normal(jax.random.key(0), (2, 3, 5, 2, 4))
    emb = np.asarray(prefix.to_peft(k_LPKH, v_LPKH))
    assert emb.shape == (5, 3 * 2 * 2 * 4)
    pkv = emb.reshape(5, 3 * 2, 2, 4).transpose(1, 2, 0, 3)
    for layer in range(3):
        np.testing.assert_array_equal(pkv[2 * layer], k_LPKH[layer].transpose(1, 0, 2))
        np.testing.assert_array_equal(pkv[2 * layer + 1], v_LPKH[layer].transpose(1, 0, 2))
    back = prefix.from_peft(jnp.asarray(emb), num_layers=3, num_kv_heads=2)
    np.testing.assert_array_equal(back[0], k_LPKH)
    np.testing.assert_array_equal(back[1], v_LPKH)


@pytest.mark.parametrize(
    "method,options,count",
    [
        # L x P x 2 (key, value) x K x H
        ("prefix", {}, 2 * 3 * 2 * 2 * 8),
        # embedding P x KH, Linear KH -> h, Linear h -> L x 2 x KH (weights + biases)
        (
            "prefix",
            {"projection": True, "projection_hidden": 12},
            3 * 16 + 16 * 12 + 12 + 2 * 2 * (12 * 16 + 16),
        ),
        ("prefix", {"projection": True}, 3 * 16 + 16 * 16 + 16 + 2 * 2 * (16 * 16 + 16)),
        # N x D
        ("prompt", {}, 3 * 32),
    ],
)
def test_trainable_count_is_analytic(method, options, count):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg(method, n=3, **options))
    assert mask.count(True) == count
    assert mask.count() == CFG.param_count() + count


def train_batch(seed, B=4, T=12):
    x = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    seg = np.ones_like(x)
    seg[0, 8:] = 0  # a padded row
    return dict(
        input_ids=x,
        loss_mask=seg,
        segment_ids=seg,
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    )


@pytest.mark.parametrize(
    "method,options",
    [("prefix", {}), ("prefix", {"projection": True}), ("prompt", {})],
)
def test_jitted_train_step_trains_only_the_virtual_tokens(method, options):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    base = {masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    mask = peft.apply_method(model, peft_cfg(method, n=3, **options))
    ocfg = default.get_config().optim
    ocfg.learning_rate, ocfg.warmup_steps = 1e-2, 1
    tx = optim.make_optimizer(ocfg, 10)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    before = jax.tree.map(np.asarray, state.params)
    step = jax.jit(steps.make_train_step(graphdef, tx))
    losses = []
    for i in range(3):
        state, metrics = step(state, frozen, train_batch(i))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    frozen_flat = {masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(frozen)}
    assert frozen_flat.keys() == base.keys()
    for path, value in frozen_flat.items():
        np.testing.assert_array_equal(value, base[path])
    for (path, a), b in zip(nnx.to_flat_state(state.params), jax.tree.leaves(before)):
        assert masks.path_str(path).startswith(method + "/")
        assert np.abs(np.asarray(a[...]) - b).max() > 0, f"{path} did not train"


def test_user_errors():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(FtlibError, match="peft.prefix.num_virtual_tokens must be > 0, got 0"):
        peft.apply_method(model, peft_cfg("prefix", n=0))
    with pytest.raises(FtlibError, match="peft.prompt.num_virtual_tokens must be > 0, got -2"):
        peft.apply_method(model, peft_cfg("prompt", n=-2))
    with pytest.raises(FtlibError, match=r"init_token_ids must lie in \[0, 64\), got 3..64"):
        peft.apply_method(model, peft_cfg("prompt", init_token_ids=(3, 64)))
    with pytest.raises(FtlibError, match=r"peft.prefix.init_token_ids must lie in \[0, 64\)"):
        peft.apply_method(model, peft_cfg("prefix", init_token_ids=(-1,)))
    with pytest.raises(FtlibError, match="use them with peft.prefix.projection=False"):
        peft.apply_method(model, peft_cfg("prefix", projection=True, init_token_ids=(1,)))


def test_every_new_param_has_a_sharding_rule():
    c = default.get_config()
    mesh = sharding.make_mesh(c.mesh)
    for method, options in [("prefix", {}), ("prefix", {"projection": True}), ("prompt", {})]:
        model = Llama(CFG, rngs=nnx.Rngs(0))
        peft.apply_method(model, peft_cfg(method, **options))
        # Raises on a logical axis ('prefix', 'prompt', ...) missing from the rules.
        sharding.tree_shardings(nnx.state(model, nnx.Param), mesh, c.sharding_rules)


@pytest.mark.slow  # imports torch, transformers and peft
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_matches_hf_peft(method):
    """Same logits as HF PEFT's prefix / prompt tuning of the same random Llama (GQA),
    from PEFT's own virtual-token values: positions, masks and the prefix layout agree."""
    import peft as hf_peft
    import torch
    from tiny_hf import hf_model

    from ftlib.models.llama import from_pretrained

    hf = hf_model()
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    theta = hf.config.rope_parameters["rope_theta"]
    model = from_pretrained(hf.config.to_dict(), tensors, rope_theta=theta)
    config_cls = dict(prefix=hf_peft.PrefixTuningConfig, prompt=hf_peft.PromptTuningConfig)
    torch.manual_seed(0)
    wrapped = hf_peft.get_peft_model(
        hf, config_cls[method](task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    values = wrapped.get_prompt_embedding_to_save("default").numpy()
    peft.apply_method(model, peft_cfg(method, n=3))
    if method == "prefix":
        k_LPKH, v_LPKH = prefix.from_peft(jnp.asarray(values), num_layers=2, num_kv_heads=2)
        model.prefix.key[...] = k_LPKH.reshape(2, 3, -1)
        model.prefix.value[...] = v_LPKH.reshape(2, 3, -1)
    else:
        model.prompt.embedding[...] = jnp.asarray(values)
    x = np.random.default_rng(0).integers(0, 256, (2, 9))
    with torch.no_grad():
        want = wrapped(input_ids=torch.from_numpy(x)).logits.numpy()[:, -9:]
    np.testing.assert_allclose(run(model, jnp.asarray(x)), want, atol=2e-4, rtol=1e-4)
