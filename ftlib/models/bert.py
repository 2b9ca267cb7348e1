"""BERT-family encoder with a sequence-classification head, in Flax NNX.

HF BertModel semantics (post-LN blocks, exact-erf GELU, learned absolute positions,
token-type embeddings, key-padding attention mask) plus BertForSequenceClassification's
head: dropout and a Linear over either the pooler (tanh Dense on [CLS], HF's choice) or
the masked mean of the last hidden states (sentence-transformers' pooling). Layers are
stacked with a leading 'layers' dim and run under `jax.lax.scan`, like ftlib's Llama.

Module paths follow HF's leaf names so PEFT regexes read the same as in HF PEFT:
encoder/attention/{query,key,value,output}, encoder/mlp/{intermediate,output},
pooler, classifier; every Linear has a bias (BitFit-style methods target `.*/bias`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models import layer_stack
from ftlib.models.layers import (
    DEFAULT_INIT,
    Linear,
    accumulation_dtype,
    einsum,
    param,
    stacked,
)
from ftlib.models.llama import REMAT_POLICIES

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    pooling: str = "cls"  # 'cls': tanh pooler on [CLS] (HF); 'mean': masked mean of tokens
    hidden_dropout: float = 0.1  # embeddings, sublayer outputs and the classifier input
    attention_dropout: float = 0.1  # attention probabilities
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool | None = None  # as LlamaConfig's
    scan_unroll: int = 1
    remat: str = "none"  # one of llama.REMAT_POLICIES

    @property
    def num_kv_heads(self) -> int:  # what the prefix-tuning hook sizes its keys by
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise FtlibError(f"model.pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.num_labels < 1:
            raise FtlibError(f"a classifier needs num_labels >= 1, got {self.num_labels}")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "BertConfig":
        """Maps an HF BertConfig `config.json` dict to ours; refuses variants we do not run."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise FtlibError(f"BERT hidden_act {act!r} is not supported (only exact 'gelu')")
        positions = hf.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise FtlibError(f"BERT position_embedding_type {positions!r} is not supported")
        if hf.get("is_decoder"):
            raise FtlibError("a BERT decoder checkpoint (is_decoder=True) is not supported")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_positions=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        )
        fields.update(overrides)
        return cls(**fields)


class LayerNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        rngs: nnx.Rngs,
        num_layers: int | None = None,
        param_dtype=jnp.float32,
    ):
        shape, axes = stacked(num_layers, (dim,), ("norm",))
        self.scale = param(rngs, nnx.initializers.ones, shape, axes, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, shape, axes, param_dtype)
        self.eps = eps

    def __call__(self, x):
        # Statistics in fp32 whatever the compute dtype: bf16 variance underflows.
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def dropout(x, rate: float, rng):
    """Inverted dropout; identity at eval (rng None) or rate 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _split(rng, n):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.word = param(rngs, DEFAULT_INIT, (cfg.vocab_size, d), ("vocab", "embed"), pdt)
        self.position = param(
            rngs, DEFAULT_INIT, (cfg.max_positions, d), ("positions", "embed"), pdt
        )
        self.token_type = param(
            rngs, DEFAULT_INIT, (cfg.type_vocab_size, d), ("token_types", "embed"), pdt
        )
        self.norm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=pdt)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, input_ids_BT, token_type_ids_BT, soft_ND=None, first_position=0):
        """soft_ND: prompt-tuning embeddings placed before the input's word embeddings
        (they get positions and token type 0 like any token, as in HF PEFT);
        first_position: where positions start (prefix tuning shifts them, as HF does
        for past keys)."""
        word_BTD = jnp.take(self.word[...], input_ids_BT, axis=0)
        type_ids_BT = token_type_ids_BT
        if soft_ND is not None:
            B, N = input_ids_BT.shape[0], soft_ND.shape[0]
            soft_BND = jnp.broadcast_to(soft_ND.astype(word_BTD.dtype), (B, *soft_ND.shape))
            word_BTD = jnp.concatenate([soft_BND, word_BTD], axis=1)
            type_ids_BT = jnp.concatenate([jnp.zeros((B, N), type_ids_BT.dtype), type_ids_BT], 1)
        T = word_BTD.shape[1]
        if first_position + T > self.position.shape[0]:
            raise FtlibError(
                f"BERT has {self.position.shape[0]} positions; {T} tokens starting at position "
                f"{first_position} (virtual tokens included) do not fit: shorten data.seq_len "
                "or the prefix/prompt"
            )
        h_BTD = (
            word_BTD
            + self.position[...][None, first_position : first_position + T]
            + jnp.take(self.token_type[...], type_ids_BT, axis=0)
        )
        return self.norm(h_BTD).astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, **kw):
        d = cfg.hidden_size
        self.query = Linear(d, d, ("embed", "heads"), rngs=rngs, use_bias=True, **kw)
        self.key = Linear(d, d, ("embed", "heads"), rngs=rngs, use_bias=True, **kw)
        self.value = Linear(d, d, ("embed", "heads"), rngs=rngs, use_bias=True, **kw)
        self.output = Linear(d, d, ("heads", "embed"), rngs=rngs, use_bias=True, **kw)
        self.num_heads, self.attention_dropout = cfg.num_heads, cfg.attention_dropout

    def __call__(self, x_BTD, mask_BS, rng=None, prefix_kv=None):
        """prefix_kv: None or this layer's prefix (k_PNH, v_PNH), attended to by every
        token before its own keys."""
        B, T, D = x_BTD.shape
        N = self.num_heads
        keys = _split(rng, 5)
        q = self.query(x_BTD, rng=keys[0]).reshape(B, T, N, D // N)
        k = self.key(x_BTD, rng=keys[1]).reshape(B, T, N, D // N)
        v = self.value(x_BTD, rng=keys[2]).reshape(B, T, N, D // N)
        if prefix_kv is not None:
            k_BPNH, v_BPNH = (jnp.broadcast_to(x.astype(k.dtype), (B, *x.shape)) for x in prefix_kv)
            k, v = jnp.concatenate([k_BPNH, k], 1), jnp.concatenate([v_BPNH, v], 1)
            mask_BS = jnp.concatenate([jnp.ones((B, k_BPNH.shape[1]), bool), mask_BS], 1)
        acc = accumulation_dtype(q, k)  # float32 results for XLA:CPU's bf16 kernels
        scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=acc)
        scores_BNTS = scores_BNTS * ((D // N) ** -0.5)
        # Finite fill: an all-padding filler row gets uniform weights instead of NaNs.
        scores_BNTS = jnp.where(mask_BS[:, None, None], scores_BNTS.astype(jnp.float32), -1e30)
        probs = jax.nn.softmax(scores_BNTS, axis=-1).astype(v.dtype)
        probs = dropout(probs, self.attention_dropout, keys[3])
        out_BTNH = einsum("bnts,bsnh->btnh", probs, v)
        return self.output(out_BTNH.reshape(B, T, D), rng=keys[4])


class MLP(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, **kw):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.intermediate = Linear(d, f, ("embed", "mlp"), rngs=rngs, use_bias=True, **kw)
        self.output = Linear(f, d, ("mlp", "embed"), rngs=rngs, use_bias=True, **kw)

    def __call__(self, x_BTD, rng=None):
        keys = _split(rng, 2)
        h = jax.nn.gelu(self.intermediate(x_BTD, rng=keys[0]), approximate=False)
        return self.output(h, rng=keys[1])


class Block(nnx.Module):
    """One post-LN encoder layer; its params are stacked over `num_layers`."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, num_layers: int):
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(num_layers=num_layers, param_dtype=pdt, dtype=jnp.dtype(cfg.dtype))
        norm = dict(rngs=rngs, num_layers=num_layers, param_dtype=pdt)
        self.attention = Attention(cfg, rngs=rngs, **kw)
        self.attention_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.mlp = MLP(cfg, rngs=rngs, **kw)
        self.output_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.hidden_dropout = cfg.hidden_dropout

    def __call__(self, x_BTD, mask_BS, rng=None, prefix_kv=None):
        keys = _split(rng, 4)
        a = self.attention(x_BTD, mask_BS, rng=keys[0], prefix_kv=prefix_kv)
        a = dropout(a, self.hidden_dropout, keys[1])
        x_BTD = self.attention_norm(x_BTD + a)
        m = dropout(self.mlp(x_BTD, rng=keys[2]), self.hidden_dropout, keys[3])
        return self.output_norm(x_BTD + m)


def _classifier(cfg: BertConfig, rngs: nnx.Rngs) -> Linear:
    # HF's init for a new head: normal(0.02) kernel, zero bias.
    return Linear(
        cfg.hidden_size,
        cfg.num_labels,
        ("embed", "classes"),
        rngs=rngs,
        use_bias=True,
        param_dtype=jnp.dtype(cfg.param_dtype),
        dtype=jnp.dtype(cfg.dtype),
    )


class BertClassifier(nnx.Module):
    """input ids -> class logits [B, num_labels]; `hidden` gives BertModel's last hidden states."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Block(cfg, rngs=rngs, num_layers=cfg.num_layers)
        d = cfg.hidden_size
        self.pooler = (
            Linear(d, d, ("embed", "embed"), rngs=rngs, use_bias=True, param_dtype=pdt, dtype=dt)
            if cfg.pooling == "cls"
            else None
        )
        self.classifier = _classifier(cfg, rngs)
        # PEFT hooks, None unless a method installs them (same contract as Llama's):
        # `prefix() -> (k_LPKH, v_LPKH)` keys/values every token attends to in each
        # layer (positions shift by P); `prompt() -> soft_ND` embeddings before the
        # input (positions shift by N). Outputs cover only the T input positions.
        self.prefix = nnx.data(None)
        self.prompt = nnx.data(None)

    def token_embeddings(self):
        """The [vocab, D] word-embedding table (prompt tuning initialises from it)."""
        return self.embeddings.word[...]

    def hidden(self, input_ids_BT, attention_mask_BT=None, token_type_ids_BT=None, *, rng=None):
        """Last hidden states [B, T, D]; attention_mask 0 marks padding (never attended to)."""
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones(input_ids_BT.shape, bool)
        if token_type_ids_BT is None:
            token_type_ids_BT = jnp.zeros(input_ids_BT.shape, jnp.int32)
        keys = _split(rng, 2)
        prefix_kv = None if self.prefix is None else self.prefix()
        soft_ND = None if self.prompt is None else self.prompt()
        P = 0 if prefix_kv is None else prefix_kv[0].shape[1]
        N = 0 if soft_ND is None else soft_ND.shape[0]
        h = self.embeddings(input_ids_BT, token_type_ids_BT, soft_ND, first_position=P)
        h = dropout(h, self.cfg.hidden_dropout, keys[0])
        mask_BS = jnp.concatenate([jnp.ones((B, N), bool), attention_mask_BT.astype(bool)], 1)
        return self._run_blocks(h, mask_BS, keys[1], prefix_kv)[:, N:]

    def _run_blocks(self, h, mask_BS, rng, prefix_kv=None):
        graphdef, state = nnx.split(self.encoder)
        L = self.cfg.num_layers
        keys = jax.random.split(rng, L) if rng is not None else None

        def body(h, layer):
            layer_state, key, layer_prefix = layer
            return nnx.merge(graphdef, layer_state)(
                h, mask_BS, rng=key, prefix_kv=layer_prefix
            ), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
        scan = layer_stack.scans_layers(self.cfg.scan_layers, L)
        xs = (state, keys, prefix_kv)
        return layer_stack.run(body, h, xs, L, scan=scan, unroll=self.cfg.scan_unroll)[0]

    def pool(self, h_BTD, attention_mask_BT=None):
        """[B, D] sentence vectors: the tanh pooler on [CLS], or the mean over real tokens."""
        if self.pooler is not None:
            return jnp.tanh(self.pooler(h_BTD[:, 0]))
        if attention_mask_BT is None:
            return jnp.mean(h_BTD, axis=1)
        w_BT = attention_mask_BT.astype(h_BTD.dtype)
        total_BD = jnp.einsum("btd,bt->bd", h_BTD, w_BT)
        return total_BD / jnp.maximum(jnp.sum(w_BT, axis=1, keepdims=True), 1.0)

    def __call__(self, input_ids_BT, attention_mask_BT=None, token_type_ids_BT=None, *, rng=None):
        keys = _split(rng, 3)
        h_BTD = self.hidden(input_ids_BT, attention_mask_BT, token_type_ids_BT, rng=keys[0])
        pooled_BD = dropout(self.pool(h_BTD, attention_mask_BT), self.cfg.hidden_dropout, keys[1])
        return self.classifier(pooled_BD, rng=keys[2])


# HF name (after the optional 'bert.' prefix) -> our path; '.weight' of a Linear is
# transposed to [in, out]. Layer names ({i}) are stacked over layers.
_HF_GLOBAL_MAP = {
    "embeddings.word_embeddings.weight": ("embeddings", "word"),
    "embeddings.position_embeddings.weight": ("embeddings", "position"),
    "embeddings.token_type_embeddings.weight": ("embeddings", "token_type"),
    "embeddings.LayerNorm.weight": ("embeddings", "norm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings", "norm", "bias"),
}
_HF_LINEARS = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "intermediate.dense": ("mlp", "intermediate"),
    "output.dense": ("mlp", "output"),
}
_HF_NORMS = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
# Pre-training heads (masked LM, next sentence) that BertModel checkpoints often carry.
_IGNORED_PREFIXES = ("cls.",)


def _canonical(name: str) -> str:
    """HF's own renames on load: no 'bert.' prefix, LayerNorm gamma/beta -> weight/bias."""
    name = name.removeprefix("bert.")
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )


def hf_to_params(cfg: BertConfig, tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """HF-named tensors -> {our param path: array}, layers stacked. The classifier is
    included only if the checkpoint has one; the pooler's tensors are unused with mean
    pooling. Raises on a missing layer tensor or any unexpected tensor."""
    tensors = {_canonical(k): v for k, v in tensors.items()}
    out = {path: tensors[name] for name, path in _HF_GLOBAL_MAP.items() if name in tensors}
    used = set(_HF_GLOBAL_MAP)
    layer_items = [(f"{hf}.weight", (*ours, "kernel"), True) for hf, ours in _HF_LINEARS.items()]
    layer_items += [(f"{hf}.bias", (*ours, "bias"), False) for hf, ours in _HF_LINEARS.items()]
    for hf, ours in _HF_NORMS.items():
        layer_items += [
            (f"{hf}.weight", (ours, "scale"), False),
            (f"{hf}.bias", (ours, "bias"), False),
        ]
    for suffix, path, transpose in layer_items:
        names = [f"encoder.layer.{i}.{suffix}" for i in range(cfg.num_layers)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise FtlibError(f"BERT checkpoint has no tensor {missing[0]}")
        used.update(names)
        out[("encoder", *path)] = np.stack(
            [tensors[n].T if transpose else tensors[n] for n in names]
        )
    heads = {"classifier": "classifier", "pooler.dense": "pooler"}
    used.update(f"{hf}.{kind}" for hf in heads for kind in ("weight", "bias"))
    if cfg.pooling != "cls":
        del heads["pooler.dense"]  # mean pooling has no pooler
    for hf, ours in heads.items():
        if f"{hf}.weight" in tensors:
            out[(ours, "kernel")] = tensors[f"{hf}.weight"].T
            out[(ours, "bias")] = tensors[f"{hf}.bias"]
    unexpected = sorted(n for n in set(tensors) - used if not n.startswith(_IGNORED_PREFIXES))
    if unexpected:
        raise FtlibError(f"checkpoint has tensors the BERT model does not use: {unexpected[:5]}")
    return out


def from_pretrained(
    hf_config: dict, tensors: dict[str, np.ndarray], *, seed: int = 0, **overrides
) -> BertClassifier:
    """A BertClassifier from HF config + tensors; the classifier is freshly initialised
    from `seed` unless the checkpoint has one (BertForSequenceClassification)."""
    cfg = BertConfig.from_hf(hf_config, **overrides)
    model = nnx.eval_shape(lambda: BertClassifier(cfg, rngs=nnx.Rngs(0)))
    arrays = hf_to_params(cfg, tensors)
    if ("classifier", "kernel") not in arrays:
        model.classifier = _classifier(cfg, nnx.Rngs(seed))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if path[0] == "classifier" and ("classifier", "kernel") not in arrays:
            continue
        if path not in arrays:
            hint = " (or set model.pooling='mean')" if path[0] == "pooler" else ""
            raise FtlibError(f"checkpoint has no tensor for param {name}{hint}")
        value = arrays[path]
        if value.shape != var.shape:
            raise FtlibError(
                f"param {name}: checkpoint shape {value.shape}, model expects {var.shape}"
            )
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return model
