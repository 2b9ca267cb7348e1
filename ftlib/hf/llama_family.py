"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) in HF terms.

Import: a folder's `config.json` is read through transformers' own config class, so keys a
file leaves out get that family's defaults (Llama unties embeddings, transformers 5 keeps
rope_theta under `rope_parameters`), then flattened to the keys `LlamaConfig.from_hf` reads;
features ftlib does not implement are refused by name. Export: the inverse of
`ftlib.models.llama.hf_to_params`, and a config.json transformers loads back.
"""

from __future__ import annotations

import warnings

import numpy as np
import transformers
from flax import nnx

from ftlib.hf.checkpoint_source import CheckpointError
from ftlib.models.llama import _HF_LAYER_MAP, Llama, LlamaConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
_CAUSAL_LM = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def normalize_config(raw: dict, where: str) -> dict:
    """`raw` plus the keys LlamaConfig.from_hf reads, with the family's defaults filled in."""
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(raw["model_type"], **fields)
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(
            f"{where}: RoPE scaling {rope['rope_type']!r} is not supported (only plain RoPE)"
        )
    if hf.hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
    if getattr(hf, "mlp_bias", False):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if hf.model_type == "llama" and hf.attention_bias:
        # HF Llama's attention_bias also adds an o_proj bias, which ftlib's Llama lacks.
        raise CheckpointError(
            f"{where}: llama attention_bias=true (q/k/v/o biases) is not supported; "
            "only Qwen2-style q/k/v biases are"
        )
    use_window = getattr(hf, "use_sliding_window", True)
    window = getattr(hf, "sliding_window", None) if use_window else None
    if window:
        warnings.warn(
            f"{where}: sliding-window attention ({window} tokens) is not implemented; "
            f"the model is exact for sequences of up to {window} tokens",
            stacklevel=2,
        )
    return {
        **raw,
        "num_key_value_heads": hf.num_key_value_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "rms_norm_eps": hf.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "tie_word_embeddings": hf.tie_word_embeddings,
        # Qwen2 always has q/k/v biases and no flag for them.
        "attention_bias": hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
    }


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model of `cfg`, read off the model's own params."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shapes = {
        "model.embed_tokens.weight": params[("embed", "embedding")],
        "model.norm.weight": params[("final_norm", "scale")],
    }
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = params[("lm_head", "kernel")][::-1]
    for suffix, (path, transpose) in _HF_LAYER_MAP.items():
        if ("blocks", *path) not in params:
            continue
        layer_shape = params[("blocks", *path)][1:]
        for i in range(cfg.num_layers):
            shapes[f"model.layers.{i}.{suffix}"] = layer_shape[::-1] if transpose else layer_shape
    return shapes


def check_tensors(hf_config: dict, tensors: dict[str, np.ndarray], where: str) -> None:
    """Every tensor the config implies is present with its shape, and no other is."""
    shapes = expected_shapes(LlamaConfig.from_hf(hf_config))
    for name, shape in shapes.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the config "
                f"implies {shape}"
            )
    # HF may save a tied lm_head anyway; rotary inverse frequencies are recomputed.
    ignored = {"lm_head.weight"} if hf_config.get("tie_word_embeddings") else set()
    unexpected = sorted(
        n for n in set(tensors) - set(shapes) - ignored if not n.endswith("rotary_emb.inv_freq")
    )
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} tensors a {hf_config['model_type']} model of this "
            f"config does not use, e.g. {unexpected[:3]}"
        )


def params_to_hf(cfg: LlamaConfig, params: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """{ftlib param path: array} of a plain (merged) Llama -> HF-named float32 tensors."""
    out = {
        "model.embed_tokens.weight": params[("embed", "embedding")],
        "model.norm.weight": params[("final_norm", "scale")],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params[("lm_head", "kernel")].T
    for suffix, (path, transpose) in _HF_LAYER_MAP.items():
        stacked = params.get(("blocks", *path))
        if stacked is None:
            continue
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{suffix}"] = stacked[i].T if transpose else stacked[i]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_config(
    cfg: LlamaConfig, source_config: dict, tokenizer
) -> transformers.PretrainedConfig:
    """The HF config of an exported model: the source checkpoint's config (a random-init run
    has none) with ftlib's architecture fields and float32 weights."""
    model_type = source_config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        model_type = "qwen2" if cfg.attention_bias else "llama"
    drop = {"model_type", "rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype"}
    fields = {k: v for k, v in source_config.items() if k not in drop}
    fields.update(
        architectures=[_CAUSAL_LM[model_type]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        dtype="float32",
    )
    if model_type == "llama":
        fields["attention_bias"] = False
    else:  # normalize_config's flag; Qwen2 and Mistral configs have no such key
        fields.pop("attention_bias", None)
    for key in ("bos", "eos", "pad"):
        if fields.get(f"{key}_token_id") is None:
            fields[f"{key}_token_id"] = getattr(tokenizer, f"{key}_token_id")
    return transformers.AutoConfig.for_model(model_type, **fields)
