"""LoRA adapters in HF PEFT's folder format, out of ftlib and back in; prompt tuning, prefix
tuning and IA3 out of ftlib (`save_peft` picks by method).

A PEFT LoRA folder is `adapter_config.json` (peft_type LORA, r, lora_alpha, use_rslora,
target_modules) and `adapter_model.safetensors` with one pair per adapted module and layer:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `lora_B.weight`
[out, r]. ftlib stacks layers: lora_a [L, r, in] is lora_A per layer, lora_b [L, r, out] is
lora_B transposed. The scale alpha / r (alpha / sqrt(r) with rsLoRA) is the same in both.

PROMPT_TUNING and PREFIX_TUNING folders hold one tensor, `prompt_embeddings`: the soft tokens
[N, D], or the prefix keys and values [P, L*2*K*H] (ftlib.peft.prefix.to_peft's layout, a
projection MLP folded first). IA3 holds `...{module}.ia3_l` per layer: [out, 1] for scaled
outputs, [1, in] for the scaled inputs of feedforward_modules.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.peft import prefix as prefix_lib
from ftlib.peft.ia3 import IA3Linear
from ftlib.peft.lora import LoRALinear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# ftlib module path under blocks/ -> HF module path under model.layers.{i}.
_HF_BLOCK_MODULES = {"attn": "self_attn", "mlp": "mlp"}


def _hf_modules(path: tuple, num_layers: int) -> list[str]:
    """HF module names of the ftlib module at `path`: one per layer for stacked blocks."""
    if path == ("lm_head",):
        return ["lm_head"]
    if len(path) == 3 and path[0] == "blocks" and path[1] in _HF_BLOCK_MODULES:
        sub = f"{_HF_BLOCK_MODULES[path[1]]}.{path[2]}"
        return [f"model.layers.{i}.{sub}" for i in range(num_layers)]
    raise FtlibError(f"an adapter on {'/'.join(path)} has no HF PEFT module name")


def lora_modules(model: nnx.Module) -> dict[tuple, LoRALinear]:
    return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def save_peft_adapter(model: nnx.Module, lora_cfg, out, base_model: str) -> pathlib.Path:
    """Writes `model`'s LoRA factors as a PEFT adapter folder for the HF base `base_model`.

    lora_cfg is config.peft.lora (rank, alpha, rslora, dropout)."""
    modules = lora_modules(model)
    if not modules:
        raise FtlibError("the model has no LoRA modules to export")
    tensors = {}
    for path, m in modules.items():
        a, b = np.asarray(m.lora_a.get_value()), np.asarray(m.lora_b.get_value())
        names = _hf_modules(path, model.cfg.num_layers)
        stacked = a.ndim == 3  # [L, r, in] for blocks, [r, in] for lm_head
        for name, a_i, b_i in zip(names, a if stacked else [a], b if stacked else [b]):
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_i, np.float32)
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T, np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha),
        "use_rslora": bool(lora_cfg.rslora),
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": sorted({path[-1] for path in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return _write(out, config, tensors)


def _write(out, config: dict, tensors: dict) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise FtlibError(f"export folder {out} is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


def _prompt_learning_config(model, peft_type: str, n: int, **extra) -> dict:
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(n),
        "num_layers": int(model.cfg.num_layers),
        "num_transformer_submodules": 1,
        "inference_mode": True,
        **extra,
    }


def save_peft_prompt(model: nnx.Module, out, base_model: str) -> pathlib.Path:
    """Writes `model`'s soft prompt as a PEFT PROMPT_TUNING folder."""
    if getattr(model, "prompt", None) is None:
        raise FtlibError("the model has no soft prompt to export")
    soft_ND = np.asarray(model.prompt(), np.float32)
    config = _prompt_learning_config(
        model,
        "PROMPT_TUNING",
        soft_ND.shape[0],
        base_model_name_or_path=base_model,
        token_dim=int(soft_ND.shape[1]),
        num_attention_heads=int(model.cfg.num_heads),
        prompt_tuning_init="RANDOM",  # the values come from the file
    )
    return _write(out, config, {"prompt_embeddings": np.ascontiguousarray(soft_ND)})


def save_peft_prefix(model: nnx.Module, out, base_model: str) -> pathlib.Path:
    """Writes `model`'s prefix as a PEFT PREFIX_TUNING folder (prefix_projection=False: a
    projection MLP is folded into the plain vectors it computes, in place)."""
    if getattr(model, "prefix", None) is None:
        raise FtlibError("the model has no prefix to export")
    prefix_lib.fold(model)
    k_LPKH, v_LPKH = model.prefix()
    _, P, K, H = k_LPKH.shape
    config = _prompt_learning_config(
        model,
        "PREFIX_TUNING",
        P,
        base_model_name_or_path=base_model,
        token_dim=int(K * H),  # PEFT's prefix width is the kv width (GQA: K heads)
        num_attention_heads=int(K),
        encoder_hidden_size=int(K * H),
        prefix_projection=False,
    )
    emb_PX = np.asarray(prefix_lib.to_peft(k_LPKH, v_LPKH), np.float32)
    return _write(out, config, {"prompt_embeddings": np.ascontiguousarray(emb_PX)})


def save_peft_ia3(model: nnx.Module, out, base_model: str) -> pathlib.Path:
    """Writes `model`'s IA3 vectors as a PEFT IA3 folder."""
    modules = {p: m for p, m in nnx.iter_modules(model) if isinstance(m, IA3Linear)}
    if not modules:
        raise FtlibError("the model has no IA3 modules to export")
    tensors, kinds = {}, {}
    for path, m in modules.items():
        name = path[-1]
        if kinds.setdefault(name, m.scale_input) != m.scale_input:
            raise FtlibError(
                f"IA3 scales the input of some {name} modules and the output of others; "
                "PEFT's feedforward_modules names modules by their last name"
            )
        s = np.asarray(m.ia3_scale.get_value(), np.float32)
        names = _hf_modules(path, model.cfg.num_layers)
        for hf_name, s_i in zip(names, s if path[0] == "blocks" else [s]):
            shaped = s_i[None, :] if m.scale_input else s_i[:, None]
            tensors[f"{_PREFIX}{hf_name}.ia3_l"] = np.ascontiguousarray(shaped)
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": sorted(kinds),
        "feedforward_modules": sorted(n for n, ff in kinds.items() if ff),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    return _write(out, config, tensors)


PEFT_METHODS = ("lora", "prompt", "prefix", "ia3")


def save_peft(model: nnx.Module, peft_cfg, out, base_model: str) -> pathlib.Path:
    """Writes the adapter of a single-method run (peft_cfg = config.peft) in PEFT's format."""
    method = peft_cfg.method
    if method == "lora":
        return save_peft_adapter(model, peft_cfg.lora, out, base_model)
    savers = {"prompt": save_peft_prompt, "prefix": save_peft_prefix, "ia3": save_peft_ia3}
    if method not in savers:
        raise FtlibError(
            f"PEFT-format export covers peft.method {', '.join(PEFT_METHODS)}, not {method!r}"
        )
    return savers[method](model, out, base_model)


def read_peft_config(path) -> dict:
    """adapter_config.json of a PEFT LoRA folder; raises for other folders and PEFT types."""
    file = pathlib.Path(path) / CONFIG
    if not file.is_file():
        raise FtlibError(f"{path} is not a PEFT adapter folder: no {CONFIG}")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise FtlibError(
            f"{file}: peft_type {config.get('peft_type')!r}; only LORA adapters can be imported"
        )
    # Per-layer ranks, layer subsets, extra trained modules: none has an ftlib equivalent.
    unsupported = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern")
    for key in (*unsupported, "layers_to_transform", "modules_to_save"):
        if config.get(key):
            raise FtlibError(
                f"{file}: {key}={config[key]!r} is not supported (plain LoRA on every layer)"
            )
    if not isinstance(config.get("target_modules"), list):
        raise FtlibError(
            f"{file}: target_modules {config.get('target_modules')!r} must be a list of "
            "module names (regex targets are not supported)"
        )
    return config


def lora_options(path) -> dict:
    """config.peft.lora values that rebuild the adapter's surgery in ftlib."""
    config = read_peft_config(path)
    names = "|".join(re.escape(n) for n in config["target_modules"])
    return {
        "rank": config["r"],
        "alpha": float(config["lora_alpha"]),
        "rslora": bool(config.get("use_rslora", False)),
        "dropout": float(config.get("lora_dropout", 0.0)),
        "target_modules": f"(.*/)?({names})",
    }


def load_peft_adapter(model: nnx.Module, path) -> dict:
    """Sets the LoRA factors of `model` (after LoRA surgery with `lora_options(path)`) from a
    PEFT adapter folder. Every file tensor must land in a module and every module must get
    its tensors. Returns the adapter config."""
    config = read_peft_config(path)
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = safetensors.numpy.load_file(pathlib.Path(path) / WEIGHTS)
    # Files saved with a named adapter may keep the name: '...q_proj.lora_A.default.weight'.
    tensors = {
        re.sub(r"\.(lora_[AB])\.\w+\.weight$", r".\1.weight", k): v for k, v in tensors.items()
    }
    used = set()
    modules = lora_modules(model)
    if not modules:
        raise FtlibError("the model has no LoRA modules; apply LoRA surgery before loading")
    for path_, m in modules.items():
        if not np.isclose(m.scale, scale):
            raise FtlibError(
                f"adapter {path}: scale {scale} (r={config['r']}, alpha={config['lora_alpha']}), "
                f"the model's {'/'.join(path_)}: {m.scale}; set config.peft.lora from lora_options"
            )
        a_parts, b_parts = [], []
        for name in _hf_modules(path_, model.cfg.num_layers):
            keys = [f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise FtlibError(f"adapter {path} has no tensor {missing[0]}")
            used.update(keys)
            a_parts.append(tensors[keys[0]])
            b_parts.append(tensors[keys[1]].T)
        stacked = path_[0] == "blocks"
        a = np.stack(a_parts) if stacked else a_parts[0]
        b = np.stack(b_parts) if stacked else b_parts[0]
        for var, value, what in ((m.lora_a, a, "lora_A"), (m.lora_b, b, "lora_B")):
            if tuple(value.shape) != tuple(var.shape):
                raise FtlibError(
                    f"adapter {path}: {what} of {'/'.join(path_)} stacks to {value.shape}, "
                    f"the model expects {tuple(var.shape)}"
                )
            var.set_value(jnp.asarray(value, var.dtype))
    unused = sorted(set(tensors) - used)
    if unused:
        raise FtlibError(
            f"adapter {path}: {len(unused)} tensors for modules the model's LoRA does not "
            f"target, e.g. {unused[0]}"
        )
    return config
