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
from flax import nnx, struct

from ftlib.errors import FtlibError
from ftlib.models import layer_stack
from ftlib.models.attention import IMPLS, attention, causal_attention
from ftlib.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    rope_tables,
    swiglu,
)
from ftlib.models.products import down_projection, project

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
    # lax.scan over blocks; False: a Python loop, same params; None: by backend
    # (layer_stack.scans_layers)
    scan_layers: bool | None = None
    scan_unroll: int = 1  # layers per scan iteration (more: faster steps, longer compile)
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "auto"  # causal self-attention kernel: ftlib.models.attention.IMPLS

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise FtlibError(f"model.remat={self.remat!r}: expected one of {list(REMAT_POLICIES)}")
        if self.attention not in IMPLS:
            raise FtlibError(f"model.attention={self.attention!r}: expected one of {list(IMPLS)}")

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
        self.impl = cfg.attention

    def __call__(self, x_BTD, cos, sin, mask_BTS, rng=None, kv=None, segment_ids_BT=None):
        """kv: None (attend over this call's T tokens) or (k_BSKH, v_BSKH, index), a
        buffer of S slots (prefix key/values, earlier tokens) that this call's keys
        and values are written into at slot `index` before attending over all S.
        segment_ids_BT: None, or what mask_BTS says for kernels that read segment ids.
        Returns (out_BTD, the updated (k, v) buffers or None)."""
        B, T, _ = x_BTD.shape
        K, N, H = self.num_kv_heads, self.num_heads, self.head_dim
        keys = _split(rng, 4)
        q, k, v = project([self.q_proj, self.k_proj, self.v_proj], x_BTD, keys[:3])
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:  # self-attention over this call's tokens: the mask is causal
            out_BTNH = causal_attention(
                q, k, v, mask_BTS, segment_ids_BT=segment_ids_BT, impl=self.impl
            )
        else:
            k_buf, v_buf, index = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_buf, k.astype(k_buf.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_buf, v.astype(v_buf.dtype), index, axis=1)
            out_BTNH = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask_BTS)
        (out,) = project([self.o_proj], out_BTNH.reshape(B, T, N * H), keys[3:])
        return out, None if kv is None else (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, x_BTD, rng=None):
        keys = _split(rng, 3)
        gate, up = project([self.gate_proj, self.up_proj], x_BTD, keys[:2])
        down = down_projection(self.down_proj, gate, up, keys[2])  # h recomputed
        return self.down_proj(swiglu(gate, up), rng=keys[2]) if down is None else down


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

    def __call__(self, x_BTD, cos, sin, mask_BTS, rng=None, kv=None, segment_ids_BT=None):
        keys = _split(rng, 2)
        a_BTD, kv = self.attn(
            self.attn_norm(x_BTD), cos, sin, mask_BTS, keys[0], kv, segment_ids_BT
        )
        x_BTD = x_BTD + a_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD), rng=keys[1]), kv


@struct.dataclass
class KVCache:
    """Keys/values of every layer for S slots: [prefix | soft prompt | input | new tokens]."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    valid_BS: jax.Array  # slot holds a key to attend to (not padding, not yet written)
    index: jax.Array  # next slot to write (int32 scalar)
    offset: jax.Array  # virtual tokens (prefix + soft prompt) that shift input positions


class Llama(nnx.Module):
    """Two optional PEFT hooks, None unless a method installs them:
    `prefix() -> (k_LPKH, v_LPKH)`: per-layer keys/values that every real token
    attends to (no RoPE on them; real positions shift by P, as in HF PEFT);
    `prompt() -> soft_ND`: embeddings prepended to the input (positions shift by N).
    Either way the outputs and labels cover only the T input positions."""

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
        # Data attributes (not static), so PEFT surgery can install modules there.
        self.prefix = nnx.data(None)
        self.prompt = nnx.data(None)

    def token_embeddings(self):
        """The [vocab, D] input embedding table (prompt tuning initialises from it)."""
        return self.embed.embedding[...]

    def hidden(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, *, rng=None):
        """Final-norm hidden states [B, T, D]. segment_ids 0 = padding; tokens attend
        causally within their own segment only (packed rows stay independent)."""
        return self.prefill(input_ids_BT, positions_BT, segment_ids_BT, rng=rng)[0]

    def prefill(
        self, input_ids_BT, positions_BT=None, segment_ids_BT=None, extra_slots=0, *, rng=None
    ):
        """-> (hidden [B, T, D], KVCache with `extra_slots` free slots, or None when
        there is neither a prefix nor extra_slots). Virtual tokens (prefix, soft
        prompt) are visible to every input token, whatever its segment."""
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        dt = jnp.dtype(self.cfg.dtype)
        h = self.embed(input_ids_BT)
        kv, P, N = None, 0, 0
        if self.prefix is not None:
            k_LPKH, v_LPKH = self.prefix()
            P = k_LPKH.shape[1]
        if self.prompt is not None:
            soft_ND = self.prompt().astype(dt)
            N = soft_ND.shape[0]
            h = jnp.concatenate([jnp.broadcast_to(soft_ND, (B, *soft_ND.shape)), h], axis=1)
        # Soft tokens: segment -1, positions 0..N-1, visible to every later query.
        soft_BN = jnp.full((B, N), -1, segment_ids_BT.dtype)
        seg_BQ = jnp.concatenate([soft_BN, segment_ids_BT], axis=1)
        soft_pos_BN = jnp.broadcast_to(jnp.arange(N, dtype=positions_BT.dtype), (B, N))
        pos_BQ = jnp.concatenate([soft_pos_BN, positions_BT + N], axis=1)
        Q = N + T
        causal_QQ = jnp.tril(jnp.ones((Q, Q), bool))
        mask_BQQ = causal_QQ & (
            (seg_BQ[:, :, None] == seg_BQ[:, None, :]) | (seg_BQ == -1)[:, None]
        )
        cos, sin = rope_tables(pos_BQ + P, self.cfg.head_dim, self.cfg.rope_theta)
        if P or extra_slots:
            S, L = P + Q + extra_slots, self.cfg.num_layers
            shape = (L, B, S, self.cfg.num_kv_heads, self.cfg.head_dim)
            k_buf, v_buf = jnp.zeros(shape, dt), jnp.zeros(shape, dt)
            if P:
                k_buf = k_buf.at[:, :, :P].set(k_LPKH[:, None].astype(dt))
                v_buf = v_buf.at[:, :, :P].set(v_LPKH[:, None].astype(dt))
            kv = (k_buf, v_buf, P)
            mask_BQS = jnp.concatenate(
                [
                    jnp.ones((B, Q, P), bool),
                    mask_BQQ,
                    jnp.zeros((B, Q, extra_slots), bool),
                ],
                axis=2,
            )
        else:
            mask_BQS = mask_BQQ
        # Soft tokens (segment -1, seen by all) are beyond what segment ids can say.
        segment_ids = segment_ids_BT if N == 0 else None
        h, kv = self._run_blocks(h, cos, sin, mask_BQS, rng, kv, segment_ids)
        h = self.final_norm(h[:, N:])
        if kv is None:
            return h, None
        valid_BS = jnp.concatenate(
            [jnp.ones((B, P), bool), seg_BQ != 0, jnp.zeros((B, extra_slots), bool)], axis=1
        )
        return h, KVCache(*kv, valid_BS, jnp.asarray(P + Q, jnp.int32), jnp.asarray(P + N))

    def decode(self, input_ids_BT, positions_BT, cache: KVCache):
        """Appends T tokens (input positions, as in `prefill`) at cache.index; they
        attend to the valid cache slots and causally to each other.
        -> (hidden [B, T, D], updated cache)."""
        B, T = input_ids_BT.shape
        S = cache.valid_BS.shape[1]
        slots_S = jnp.arange(S)
        new_S = (slots_S >= cache.index) & (slots_S < cache.index + T)
        valid_BS = cache.valid_BS | new_S
        causal_TS = slots_S[None, :] <= cache.index + jnp.arange(T)[:, None]
        cos, sin = rope_tables(positions_BT + cache.offset, self.cfg.head_dim, self.cfg.rope_theta)
        kv = (cache.k_LBSKH, cache.v_LBSKH, cache.index)
        h = self.embed(input_ids_BT)
        h, kv = self._run_blocks(h, cos, sin, valid_BS[:, None, :] & causal_TS, None, kv)
        return self.final_norm(h), KVCache(*kv, valid_BS, cache.index + T, cache.offset)

    def _run_blocks(self, h, cos, sin, mask_BTS, rng, kv=None, segment_ids_BT=None):
        """-> (h, stacked (k, v) buffers or None); kv = (k_LBSKH, v_LBSKH, index)."""
        graphdef, state = nnx.split(self.blocks)
        L = self.cfg.num_layers
        keys = jax.random.split(rng, L) if rng is not None else None
        buffers, index = (None, None) if kv is None else (kv[:2], kv[2])

        def body(h, layer):
            layer_state, key, layer_kv = layer
            block = nnx.merge(graphdef, layer_state)
            layer_kv = None if layer_kv is None else (*layer_kv, index)
            return block(h, cos, sin, mask_BTS, key, layer_kv, segment_ids_BT)

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy)
        scan = layer_stack.scans_layers(self.cfg.scan_layers, L)
        xs = (state, keys, buffers)
        return layer_stack.run(body, h, xs, L, scan=scan, unroll=self.cfg.scan_unroll, views=True)

    def output_projection(self):
        """-> (weight, vocab_major, dtype) when the LM head is one plain matmul, which
        lets the loss fuse it (ftlib.linear_cross_entropy); None when an adapter
        wraps the head."""
        if self.lm_head is None:
            return self.embed.embedding[...], True, self.embed.dtype
        if type(self.lm_head) is Linear and self.lm_head.bias is None:
            return self.lm_head.kernel[...], False, self.lm_head.dtype
        return None

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
