"""Model construction from config.model: a pretrained checkpoint or a seeded
random init (with the tokenizer of a named checkpoint).

The checkpoint's model_type picks the model: llama, mistral, qwen2 -> causal LM
(ftlib.models.llama); bert -> sequence classifier (ftlib.models.bert).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models import bert
from ftlib.models.llama import Llama, LlamaConfig, from_pretrained

# config.model fields that describe a random-init architecture.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig))
# Execution knobs that also apply to pretrained models.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat")
# config.model fields only a BERT classifier reads (each optional in the config).
BERT_FIELDS = ("pooling", "hidden_dropout", "attention_dropout")
# model_type -> what ftlib trains it as (mistral and qwen2 load as ftlib's Llama).
MODEL_TYPES = {
    "llama": "causal LM",
    "mistral": "causal LM",
    "qwen2": "causal LM",
    "bert": "sequence classifier",
}


def build_model(model_cfg, seed: int, num_labels: int = 0):
    """-> (model, tokenizer). config.model.checkpoint: HF folder, .gguf file or
    shipped asset name; empty = random init of the Llama architecture in config.model
    with the tokenizer of config.model.tokenizer.

    num_labels > 0 asks for a sequence classifier with that many classes (a bert
    checkpoint, head freshly initialised from `seed`); 0 for a causal LM (llama).
    """
    from ftlib.hf import load_pretrained

    runtime = {k: model_cfg[k] for k in RUNTIME_FIELDS}
    if model_cfg.checkpoint:
        source = load_pretrained(model_cfg.checkpoint)
        model_type = source.hf_config.get("model_type", "llama")
        kind = MODEL_TYPES.get(model_type)
        supported = ", ".join(f"{t} ({k})" for t, k in MODEL_TYPES.items())
        if kind is None:
            raise FtlibError(
                f"config.model.checkpoint {model_cfg.checkpoint!r} is a {model_type} model; "
                f"supported: {supported}"
            )
        if (kind == "sequence classifier") != bool(num_labels):
            fix = (
                "train it with data.format='sequence_classification'"
                if num_labels == 0
                else "data.format='sequence_classification' needs an encoder such as bert "
                "(a causal LM classifies with data.format='classification')"
            )
            raise FtlibError(
                f"config.model.checkpoint {model_cfg.checkpoint!r} is a {model_type} model, "
                f"a {kind}: {fix}"
            )
        if model_type == "bert":
            extra = {k: model_cfg[k] for k in BERT_FIELDS if k in model_cfg}
            model = bert.from_pretrained(
                source.hf_config,
                source.tensors,
                seed=seed,
                num_labels=num_labels,
                **runtime,
                **extra,
            )
            return model, source.tokenizer
        attention = model_cfg.get("attention", "auto")
        model = from_pretrained(source.hf_config, source.tensors, attention=attention, **runtime)
        return model, source.tokenizer
    if num_labels:
        raise FtlibError(
            "data.format=sequence_classification needs a pretrained encoder: set "
            "config.model.checkpoint to a bert checkpoint (e.g. 'all-minilm-l6-v2')"
        )
    if not model_cfg.tokenizer:
        raise FtlibError("config.model: set checkpoint (pretrained) or tokenizer (random init)")
    tokenizer = load_pretrained(model_cfg.tokenizer, weights=False).tokenizer
    fields = {k: model_cfg[k] for k in ARCH_FIELDS if k in model_cfg}
    fields["vocab_size"] = fields.get("vocab_size") or len(tokenizer)
    fields["head_dim"] = fields.get("head_dim") or fields["hidden_size"] // fields["num_heads"]
    return Llama(LlamaConfig(**fields), rngs=nnx.Rngs(seed)), tokenizer
