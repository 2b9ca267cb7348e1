"""Write a plain (adapter-free) ftlib Llama as an HF checkpoint folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads: config.json, model.safetensors
(float32, HF names and [out, in] layouts), generation_config.json and the tokenizer."""

from __future__ import annotations

import pathlib

import numpy as np
import safetensors.numpy
import transformers
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.hf.llama_family import export_config, params_to_hf
from ftlib.models.llama import Llama


def plain_param_paths(model: Llama) -> set[tuple]:
    """Param paths of a Llama of `model.cfg` without any PEFT surgery."""
    plain = nnx.eval_shape(lambda: Llama(model.cfg, rngs=nnx.Rngs(0)))
    return {path for path, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))}


def save_hf_folder(model: Llama, tokenizer, source_config: dict, out) -> pathlib.Path:
    """`model` must hold exactly a plain Llama's params (merge adapters first).

    source_config: the HF config of the checkpoint the run started from ({} for a random
    init); its extra keys (token ids, context length, sliding window) carry over.
    """
    params = {
        path: np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    extra = sorted("/".join(map(str, p)) for p in set(params) - plain_param_paths(model))
    if extra:
        raise FtlibError(
            f"an HF checkpoint cannot hold the params {extra[:3]}: only adapters that merge "
            "into the weights (lora, dora, ia3) export as a plain model, not prefix, prompt "
            "or bottleneck adapters"
        )
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise FtlibError(f"export folder {out} is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    hf_config = export_config(model.cfg, source_config, tokenizer)
    hf_config.save_pretrained(out)
    transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    # "format": "pt" is the metadata transformers expects of a PyTorch-layout checkpoint.
    safetensors.numpy.save_file(
        params_to_hf(model.cfg, params), out / "model.safetensors", metadata={"format": "pt"}
    )
    tokenizer.save_pretrained(out)
    return out
