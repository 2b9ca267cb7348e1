"""Prefix tuning (Li & Liang 2021): P trainable key/value vectors per layer that
every real token attends to, installed as the model's `prefix` hook.

Follows HF PEFT (prefix keys enter as past_key_values): keys are used as stored,
without RoPE, real tokens' positions shift by P, and with GQA there are P
vectors per kv head (K heads, not the N query heads). With `projection` the
prefix is PEFT's `prefix_projection` reparameterisation, embedding -> Linear ->
tanh -> Linear, for training; `fold` turns it into plain vectors for inference.

Init: PEFT's random N(0, 1) vectors, or (`init_token_ids` / `init_text`, Li & Liang's
"activations of real words") the base model's own keys and values of those tokens,
repeated or cut to P, so that at init the model is the base model reading that text first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models.layers import param
from ftlib.peft import prompt


def _uniform(fan_in: int):
    # torch.nn.Linear's default init, as PEFT's projection MLP gets it.
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Prefix(nnx.Module):
    """Plain prefix vectors, key and value [L, P, K*H] (PEFT's inference-mode layout)."""

    def __init__(
        self, num_layers: int, length: int, num_kv_heads: int, head_dim: int, *, rngs, dtype
    ):
        shape, axes = (num_layers, length, num_kv_heads * head_dim), ("layers", "prefix", "kv")
        # nn.Embedding's N(0, 1), PEFT's default for the prefix vectors.
        self.key = param(rngs, nnx.initializers.normal(1.0), shape, axes, dtype)
        self.value = param(rngs, nnx.initializers.normal(1.0), shape, axes, dtype)
        self.num_kv_heads = num_kv_heads

    def __call__(self):
        """-> (k_LPKH, v_LPKH)."""
        L, P, F = self.key.shape
        split = lambda x: x[...].reshape(L, P, self.num_kv_heads, F // self.num_kv_heads)
        return split(self.key), split(self.value)


class PrefixMLP(nnx.Module):
    """PEFT's prefix_projection: tanh MLP from P embeddings of width K*H to every
    layer's key and value. The output Linear is kept as per-layer key/value parts
    (concatenated in PEFT's (layer, key|value) order it is PEFT's one Linear)."""

    def __init__(
        self,
        num_layers: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        hidden: int,
        *,
        rngs,
        dtype,
    ):
        L, F = num_layers, num_kv_heads * head_dim
        self.embedding = param(
            rngs, nnx.initializers.normal(1.0), (length, F), ("prefix", "kv"), dtype
        )
        self.proj_in = param(rngs, _uniform(F), (F, hidden), ("kv", "mlp"), dtype)
        self.proj_in_bias = param(rngs, _uniform(F), (hidden,), ("mlp",), dtype)
        out_init = _uniform(hidden)
        self.key_out = param(rngs, out_init, (L, hidden, F), ("layers", "mlp", "kv"), dtype)
        self.key_bias = param(rngs, out_init, (L, F), ("layers", "kv"), dtype)
        self.value_out = param(rngs, out_init, (L, hidden, F), ("layers", "mlp", "kv"), dtype)
        self.value_bias = param(rngs, out_init, (L, F), ("layers", "kv"), dtype)
        self.num_kv_heads = num_kv_heads

    def __call__(self):
        """-> (k_LPKH, v_LPKH)."""
        h_PM = jnp.tanh(self.embedding[...] @ self.proj_in[...] + self.proj_in_bias[...])
        k_LPF = jnp.einsum("pm,lmf->lpf", h_PM, self.key_out[...]) + self.key_bias[...][:, None]
        v_LPF = jnp.einsum("pm,lmf->lpf", h_PM, self.value_out[...]) + self.value_bias[...][:, None]
        L, P, F = k_LPF.shape
        split = lambda x: x.reshape(L, P, self.num_kv_heads, F // self.num_kv_heads)
        return split(k_LPF), split(v_LPF)


def fold(model: nnx.Module) -> None:
    """Replaces a PrefixMLP hook by the plain Prefix it computes (same outputs,
    no MLP at inference); a plain Prefix stays as it is."""
    if not isinstance(model.prefix, PrefixMLP):
        return
    k_LPKH, v_LPKH = model.prefix()
    L, P, K, H = k_LPKH.shape
    plain = Prefix(L, P, K, H, rngs=nnx.Rngs(0), dtype=model.prefix.embedding.dtype)
    plain.key[...] = k_LPKH.reshape(L, P, K * H)
    plain.value[...] = v_LPKH.reshape(L, P, K * H)
    model.prefix = plain


def to_peft(k_LPKH, v_LPKH):
    """PEFT's saved `prompt_embeddings` [P, L*2*K*H]: per virtual token, layer-major,
    then key|value, then heads (its get_prompt views it as [P, L*2, K, H])."""
    return jnp.stack([k_LPKH, v_LPKH], axis=1).transpose(2, 0, 1, 3, 4).reshape(k_LPKH.shape[1], -1)


def from_peft(embeddings_PX, num_layers: int, num_kv_heads: int):
    """Inverse of `to_peft` -> (k_LPKH, v_LPKH)."""
    P = embeddings_PX.shape[0]
    kv_PL2KH = embeddings_PX.reshape(P, num_layers, 2, num_kv_heads, -1)
    kv_2LPKH = kv_PL2KH.transpose(2, 1, 0, 3, 4)
    return kv_2LPKH[0], kv_2LPKH[1]


def text_keys_values(model: nnx.Module, ids_P):
    """The base model's cached keys (RoPE'd at positions 0..P-1) and values of the
    tokens `ids_P` -> (k_LPKH, v_LPKH): as a prefix, the model then reads them first."""
    if not hasattr(model, "prefill"):
        raise FtlibError(
            f"peft.prefix.init_token_ids / init_text need a decoder with a KV cache; "
            f"{type(model).__name__} has none: leave them empty (random init)"
        )
    P = ids_P.shape[0]
    _, cache = model.prefill(ids_P[None], extra_slots=1)
    return cache.k_LBSKH[:, 0, :P], cache.v_LBSKH[:, 0, :P]


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    c = cfg.prefix
    prompt.check_text_resolved(c, "prefix")
    if getattr(model, "prefix", False) is not None:
        raise FtlibError(f"{type(model).__name__} has no free prefix hook for peft method 'prefix'")
    if c.num_virtual_tokens <= 0:
        raise FtlibError(f"peft.prefix.num_virtual_tokens must be > 0, got {c.num_virtual_tokens}")
    m = model.cfg
    dims = (m.num_layers, c.num_virtual_tokens, m.num_kv_heads, m.head_dim)
    dtype = jnp.dtype(m.param_dtype)
    if c.projection:
        if c.init_token_ids:
            raise FtlibError(
                "peft.prefix.init_token_ids / init_text set plain prefix vectors: "
                "use them with peft.prefix.projection=False"
            )
        hidden = c.projection_hidden or m.num_kv_heads * m.head_dim
        model.prefix = PrefixMLP(*dims, hidden, rngs=rngs, dtype=dtype)
        return
    text_kv = None
    if c.init_token_ids:  # before the hook exists: the base model's own keys and values
        vocab = model.token_embeddings().shape[0]
        ids_P = prompt.init_ids(c.init_token_ids, c.num_virtual_tokens, vocab, rngs, "prefix")
        text_kv = text_keys_values(model, ids_P)
    model.prefix = Prefix(*dims, rngs=rngs, dtype=dtype)
    if text_kv is not None:
        L, P, K, H = dims
        model.prefix.key[...] = text_kv[0].reshape(L, P, K * H).astype(dtype)
        model.prefix.value[...] = text_kv[1].reshape(L, P, K * H).astype(dtype)


# Only the prefix (or its MLP) trains.
TRAINABLE_RULES = ((r"prefix/.*", True), (r".*", False))
OPTIONS = ("num_virtual_tokens", "projection", "projection_hidden", "init_token_ids", "init_text")
