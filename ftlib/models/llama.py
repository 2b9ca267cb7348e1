"""Llama-family decoder in Flax NNX (Llama 2/3, SmolLM2, Mistral-style GQA).

Layers are stored stacked (every block param has a leading 'layers' dim) and run
with `jax.lax.scan`, so compile time does not grow with depth and PEFT surgery
on `blocks` applies to all layers at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_tables

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2-style q/k/v biases
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True  # lax.scan over blocks (False: a Python loop, same params)
    scan_unroll: int = 1  # layers per scan iteration (more: faster steps, longer compile)
    remat: str = "none"  # one of REMAT_POLICIES

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """Maps an HF `config.json` dict (LlamaConfig keys) to ours."""
        heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            attention_bias=hf.get("attention_bias", False),
        )
        fields.update(overrides)
        return cls(**fields)

    def param_count(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * block + d + head


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, **kw):
        d, hd = cfg.hidden_size, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(
            d, cfg.num_heads * hd, ("embed", "heads"), rngs=rngs, use_bias=bias, **kw
        )
        self.k_proj = Linear(
            d, cfg.num_kv_heads * hd, ("embed", "kv"), rngs=rngs, use_bias=bias, **kw
        )
        self.v_proj = Linear(
            d, cfg.num_kv_heads * hd, ("embed", "kv"), rngs=rngs, use_bias=bias, **kw
        )
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), rngs=rngs, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x_BTD, cos, sin, mask_BTS, rng=None):
        B, T, _ = x_BTD.shape
        K, G, H = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        keys = _split(rng, 4)
        q = self.q_proj(x_BTD, rng=keys[0]).reshape(B, T, K * G, H)
        k = self.k_proj(x_BTD, rng=keys[1]).reshape(B, T, K, H)
        v = self.v_proj(x_BTD, rng=keys[2]).reshape(B, T, K, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_BTKGH = q.reshape(B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k) * (H**-0.5)
        scores = jnp.where(mask_BTS[:, None, None], scores.astype(jnp.float32), -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        return self.o_proj(out_BTKGH.reshape(B, T, K * G * H), rng=keys[3])


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, x_BTD, rng=None):
        keys = _split(rng, 3)
        h = jax.nn.silu(self.gate_proj(x_BTD, rng=keys[0])) * self.up_proj(x_BTD, rng=keys[1])
        return self.down_proj(h, rng=keys[2])


class Block(nnx.Module):
    """One pre-norm decoder layer; its params are stacked over `num_layers`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, num_layers: int):
        kw = dict(
            num_layers=num_layers,
            param_dtype=jnp.dtype(cfg.param_dtype),
            dtype=jnp.dtype(cfg.dtype),
        )
        self.attn_norm = RMSNorm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            rngs=rngs,
            num_layers=num_layers,
            param_dtype=kw["param_dtype"],
        )
        self.attn = Attention(cfg, rngs=rngs, **kw)
        self.mlp_norm = RMSNorm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            rngs=rngs,
            num_layers=num_layers,
            param_dtype=kw["param_dtype"],
        )
        self.mlp = MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x_BTD, cos, sin, mask_BTS, rng=None):
        keys = _split(rng, 2)
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask_BTS, rng=keys[0])
        return x_BTD + self.mlp(self.mlp_norm(x_BTD), rng=keys[1])


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=pdt, dtype=dt)
        self.blocks = Block(cfg, rngs=rngs, num_layers=cfg.num_layers)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=pdt)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                rngs=rngs,
                param_dtype=pdt,
                dtype=dt,
            )
        )

    def hidden(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, *, rng=None):
        """Final-norm hidden states [B, T, D]. segment_ids 0 = padding; tokens attend
        causally within their own segment only (packed rows stay independent)."""
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & causal_TS
        cos, sin = rope_tables(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.embed(input_ids_BT)
        h = self._run_blocks(h, cos, sin, mask_BTS, rng)
        return self.final_norm(h)

    def _run_blocks(self, h, cos, sin, mask_BTS, rng):
        graphdef, state = nnx.split(self.blocks)
        L = self.cfg.num_layers
        keys = jax.random.split(rng, L) if rng is not None else None

        def body(h, layer):
            layer_state, key = layer
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask_BTS, rng=key), None

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, h, (state, keys), unroll=self.cfg.scan_unroll)[0]
        for i in range(L):
            layer = jax.tree.map(lambda x: x[i], (state, keys))
            h = body(h, layer)[0]
        return h

    def logits(self, h_BTD):
        if self.lm_head is None:
            return self.embed.attend(h_BTD)
        return self.lm_head(h_BTD)

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, *, rng=None):
        return self.logits(self.hidden(input_ids_BT, positions_BT, segment_ids_BT, rng=rng))


def _split(rng, n):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


# HF name -> (our path, transpose to [in, out]). {i} is stacked over layers.
_HF_LAYER_MAP = {
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), False),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), False),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}


def hf_to_params(cfg: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """HF-named tensors -> {our param path: array}, layers stacked. Raises on
    missing or unexpected tensors so a wrong checkpoint never loads silently."""
    out = {
        ("embed", "embedding"): tensors["model.embed_tokens.weight"],
        ("final_norm", "scale"): tensors["model.norm.weight"],
    }
    if not cfg.tie_embeddings:
        out[("lm_head", "kernel")] = tensors["lm_head.weight"].T
    used = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for suffix, (path, transpose) in _HF_LAYER_MAP.items():
        names = [f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers)]
        if names[0] not in tensors:
            continue
        used.update(names)
        out[("blocks", *path)] = np.stack(
            [tensors[n].T if transpose else tensors[n] for n in names]
        )
    unexpected = sorted(
        set(tensors) - used - {"lm_head.weight"} if cfg.tie_embeddings else set(tensors) - used
    )
    unexpected = [n for n in unexpected if not n.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise FtlibError(f"checkpoint has tensors the Llama model does not use: {unexpected[:5]}")
    return out


def from_pretrained(hf_config: dict, tensors: dict[str, np.ndarray], **overrides) -> Llama:
    """Builds a Llama from HF config + tensors without a wasted random init."""
    cfg = LlamaConfig.from_hf(hf_config, **overrides)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    arrays = hf_to_params(cfg, tensors)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path not in arrays:
            raise FtlibError(f"checkpoint has no tensor for param {'/'.join(map(str, path))}")
        value = arrays[path]
        if value.shape != var.shape:
            raise FtlibError(
                f"param {'/'.join(map(str, path))}: checkpoint shape {value.shape}, "
                f"model expects {var.shape}"
            )
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return model
