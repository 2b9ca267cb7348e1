"""LoRA adapters in HF PEFT's folder format, out of ftlib and back in.

A PEFT LoRA folder is `adapter_config.json` (peft_type LORA, r, lora_alpha, use_rslora,
target_modules) and `adapter_model.safetensors` with one pair per adapted module and layer:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `lora_B.weight`
[out, r]. ftlib stacks layers: lora_a [L, r, in] is lora_A per layer, lora_b [L, r, out] is
lora_B transposed. The scale alpha / r (alpha / sqrt(r) with rsLoRA) is the same in both.
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
    raise FtlibError(f"LoRA on {'/'.join(path)} has no HF PEFT module name")


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
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise FtlibError(f"export folder {out} is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


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
