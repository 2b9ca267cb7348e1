"""Adapter files: the trainable params of a fine-tuned model and what made them.

An adapter is a directory with `adapter_model.safetensors` (only the trainable
leaves, keyed by param path, e.g. 'blocks/attn/q_proj/lora_a') and
`adapter_config.json` (the peft config, the leaves' shapes and a fingerprint of
the base model). Loading it onto the same base after the same surgery
reproduces the fine-tuned model; several adapters can share one base.
"""

from __future__ import annotations

import hashlib
import json
import math

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.masks import path_str
from ftlib.metrics import run_dir

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "ftlib-adapter/1"


def _params(state) -> dict[str, nnx.Variable]:
    """Param path -> Variable for the nnx.Param leaves of a model or state."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    return {path_str(p): v for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}


def _fingerprint(params: dict[str, nnx.Variable]) -> dict:
    digest = hashlib.sha256()
    shapes = {}
    for path in sorted(params):
        value = params[path][...]
        shapes[path] = list(value.shape)
        # A few leading values per leaf tell checkpoints of one architecture apart;
        # hashing bytes (not summing floats) is exact whatever the sharding.
        digest.update(path.encode())
        digest.update(np.asarray(value.reshape(-1)[:16]).tobytes())
    count = sum(math.prod(s) for s in shapes.values())
    return {"param_count": count, "shapes": shapes, "values_sha256": digest.hexdigest()}


def base_fingerprint(frozen) -> dict:
    """Identifies the base model an adapter belongs to: param count, shapes and a
    hash of leading values of every frozen param (`frozen`: the frozen state
    from steps.init_train_state, or any state/model holding exactly those)."""
    return _fingerprint(_params(frozen))


def save_adapter(path, trainable_state, peft_cfg, fingerprint: dict):
    """Writes the trainable leaves (fp32 stays fp32: ~4 bytes a param) and the
    metadata to the directory `path`."""
    directory = run_dir(path)  # a local path or a gs:// URL
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {p: np.asarray(v[...]) for p, v in _params(trainable_state).items()}
    (directory / WEIGHTS).write_bytes(safetensors.numpy.save(tensors))
    meta = {
        "format": FORMAT,
        "peft": peft_cfg.to_dict(),
        "params": {p: list(t.shape) for p, t in tensors.items()},
        "base": fingerprint,
    }
    (directory / CONFIG).write_text(json.dumps(meta, indent=1))
    return directory


def read_config(path) -> dict:
    """The adapter's metadata; `ml_collections.ConfigDict(read_config(p)['peft'])`
    is the peft config whose surgery `load_adapter` expects."""
    file = run_dir(path) / CONFIG
    if not file.exists():
        raise FtlibError(f"{path} is not an ftlib adapter: no {CONFIG}")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise FtlibError(f"{file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_adapter(model: nnx.Module, path, peft_cfg) -> dict:
    """Sets the adapter's leaves in `model` (a base model after the surgery of
    `peft_cfg`). Raises if the adapter was made with another method or for
    another base model. Returns the adapter's metadata."""
    meta = read_config(path)
    made_with = meta["peft"]["method"]
    if made_with != peft_cfg.method:
        raise FtlibError(
            f"adapter {path} was made with peft.method {made_with!r}, "
            f"this model with {peft_cfg.method!r}"
        )
    params = _params(model)
    base = _fingerprint({p: v for p, v in params.items() if p not in meta["params"]})
    _check_base(meta["base"], base, path)
    for p, shape in meta["params"].items():
        if p not in params or list(params[p].shape) != shape:
            have = "missing" if p not in params else f"shape {list(params[p].shape)}"
            raise FtlibError(
                f"adapter {path} holds {p} {shape}, this model: {have}; apply the "
                f"adapter's own peft options (adapters.read_config) before loading"
            )
    tensors = safetensors.numpy.load((run_dir(path) / WEIGHTS).read_bytes())
    for p, value in tensors.items():
        params[p].set_value(jnp.asarray(value, params[p].dtype))
    return meta


def load_initial(model: nnx.Module, path, peft_cfg) -> str:
    """`config.peft.init_adapter`: starts training from an ftlib adapter directory
    or an HF PEFT LoRA folder (whose surgery `peft.lora` must match, see
    ftlib.hf.lora_options). Returns which kind it was."""
    file = run_dir(path) / CONFIG
    if not file.exists():
        raise FtlibError(f"peft.init_adapter {path}: no {CONFIG} (an ftlib or PEFT adapter)")
    if json.loads(file.read_text()).get("format") == FORMAT:
        load_adapter(model, path, peft_cfg)
        return "ftlib"
    from ftlib.hf import load_peft_adapter

    load_peft_adapter(model, path)
    return "peft"


def _check_base(saved: dict, current: dict, path) -> None:
    if saved == current:
        return
    odd = sorted(
        p
        for p in set(saved["shapes"]) | set(current["shapes"])
        if saved["shapes"].get(p) != current["shapes"].get(p)
    )
    if odd:
        detail = (
            f"param {odd[0]}: adapter's base {saved['shapes'].get(odd[0])}, "
            f"this model {current['shapes'].get(odd[0])}"
        )
    else:
        detail = "same shapes, different weights"
    raise FtlibError(f"adapter {path} was trained on another base model ({detail})")
