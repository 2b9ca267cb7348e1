"""Llama model: an independent numpy reference of HF's Llama forward, param
counts, scan vs unrolled, packing isolation, HF tensor mapping, and the real
SmolLM2 greedy check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models import layer_stack
from ftlib.models.llama import Llama, LlamaConfig, from_pretrained, hf_to_params

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=5e5,
    tie_embeddings=False,
)


def random_hf_tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    t = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (cfg.vocab_size, d)),
        "model.norm.weight": rng.normal(1, 0.1, (d,)),
    }
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = rng.normal(0, 0.2, (cfg.vocab_size, d))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
            "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
            "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
            "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
            "mlp.gate_proj.weight": (f, d),
            "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        }
        for k, s in shapes.items():
            t[p + k] = rng.normal(0, 0.2, s)
        t[p + "input_layernorm.weight"] = rng.normal(1, 0.1, (d,))
        t[p + "post_attention_layernorm.weight"] = rng.normal(1, 0.1, (d,))
    return {k: v.astype(np.float32) for k, v in t.items()}


def hf_config(cfg):
    return dict(
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def reference_logits(cfg, t, ids):
    """HF LlamaForCausalLM semantics in float64 numpy, written independently."""

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    def rope(x, pos):  # x [T, n, hd], rotate-half
        hd = x.shape[-1]
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
        ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None, :]
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    t = {k: v.astype(np.float64) for k, v in t.items()}
    T, hd = len(ids), cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    h = t["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        q = rope((x @ t[p + "self_attn.q_proj.weight"].T).reshape(T, cfg.num_heads, hd), pos)
        k = rope((x @ t[p + "self_attn.k_proj.weight"].T).reshape(T, cfg.num_kv_heads, hd), pos)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(T, cfg.num_kv_heads, hd)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, -1)
        h = h + o @ t[p + "self_attn.o_proj.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        g = x @ t[p + "mlp.gate_proj.weight"].T
        up = x @ t[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * up) @ t[p + "mlp.down_proj.weight"].T
    h = rms(h, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg.tie_embeddings else t["lm_head.weight"]
    return h @ head.T


@pytest.mark.parametrize("tied", [False, True])
def test_matches_numpy_reference(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    tensors = random_hf_tensors(cfg)
    model = from_pretrained(hf_config(cfg), tensors)
    ids = np.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38])
    got = np.asarray(model(jnp.asarray(ids[None]))[0])
    want = reference_logits(cfg, tensors, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_param_count_formula():
    for cfg in [CFG, dataclasses.replace(CFG, tie_embeddings=True, attention_bias=True)]:
        model = Llama(cfg, rngs=nnx.Rngs(0))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == cfg.param_count()
    # SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152, tied.
    smol = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
    )
    assert smol.param_count() == 134_515_008


def test_scan_and_unrolled_agree():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)))
    scanned = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(1))
    unrolled = Llama(dataclasses.replace(CFG, scan_layers=False), rngs=nnx.Rngs(1))
    remat = Llama(dataclasses.replace(CFG, remat="full"), rngs=nnx.Rngs(1))
    np.testing.assert_allclose(scanned(ids), unrolled(ids), atol=1e-5)
    np.testing.assert_allclose(scanned(ids), remat(ids), atol=1e-5)


def test_scan_layers_default_by_backend_and_depth(monkeypatch):
    """scan_layers=None: a Python loop on a GPU, and on a CPU up to
    LOOP_MAX_LAYERS_CPU layers; lax.scan deeper on a CPU, and on other backends."""
    ids = jnp.zeros((1, 4), jnp.int32)

    def scans(num_layers):
        model = Llama(dataclasses.replace(CFG, num_layers=num_layers), rngs=nnx.Rngs(1))
        return "scan" in str(jax.make_jaxpr(lambda x: model(x))(ids))

    shallow, deep = CFG.num_layers, layer_stack.LOOP_MAX_LAYERS_CPU + 1
    assert CFG.scan_layers is None and jax.default_backend() == "cpu"
    assert not scans(shallow) and not scans(deep - 1) and scans(deep)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not scans(shallow) and not scans(deep)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert scans(shallow)


def test_packed_segments_do_not_see_each_other():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, CFG.vocab_size, 5), rng.integers(0, CFG.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    out = model(packed, pos, seg)[0]
    np.testing.assert_allclose(out[:5], model(jnp.asarray(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(out[5:], model(jnp.asarray(b[None]))[0], atol=1e-5)


def test_flash_kernel_reads_the_packed_segment_ids():
    """attention='pallas' (the GPU flash kernel, interpreted on CPU) gets each layer
    the batch's segment ids and gives the blocked kernel's logits; a bad name is a
    config error."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)))
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))])
    blocked = Llama(dataclasses.replace(CFG, attention="blocked"), rngs=nnx.Rngs(1))
    flash = Llama(dataclasses.replace(CFG, attention="pallas"), rngs=nnx.Rngs(1))
    want, got = blocked(ids, pos, seg), flash(ids, pos, seg)
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: flash(*a))(ids, pos, seg))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1, :9], want[1, :9], atol=1e-5)  # the rest is padding
    with pytest.raises(FtlibError, match="model.attention"):
        dataclasses.replace(CFG, attention="flash")


def test_hf_mapping_rejects_bad_checkpoints():
    tensors = random_hf_tensors(CFG)
    with pytest.raises(FtlibError, match="does not use"):
        hf_to_params(CFG, {**tensors, "model.layers.0.extra.weight": np.zeros(3)})
    bad = dict(tensors)
    bad["model.norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(FtlibError, match=r"final_norm/scale: checkpoint shape \(5,\)"):
        from_pretrained(hf_config(CFG), bad)


@pytest.mark.slow
def test_smollm2_greedy_paris():
    from ftlib.hf import load_pretrained

    src = load_pretrained("smollm2-135m-instruct")
    model = from_pretrained(src.hf_config, src.tensors)
    ids = src.tokenizer("The capital of France is")["input_ids"]
    logits = model(jnp.asarray([ids]))
    assert src.tokenizer.decode([int(jnp.argmax(logits[0, -1]))]) == " Paris"
