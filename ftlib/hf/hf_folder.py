"""Read a Hugging Face checkpoint folder (config.json + safetensors) without torch or pickle."""

import contextlib
import json
import os
import pathlib

import numpy as np
import transformers
from safetensors.numpy import load_file

from ftlib.hf.checkpoint_source import (
    SUPPORTED_ARCHITECTURES,
    CheckpointError,
    PretrainedSource,
    unsupported,
)
from ftlib.hf.llama_family import LLAMA_FAMILY, check_tensors, normalize_config


def load_hf_folder(path, weights: bool = True) -> PretrainedSource:
    """Float weights as stored (HF names, cast to float32), `config.json` as a dict, and the folder's tokenizer.

    weights=False skips reading the tensors (tokenizer and config only).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it an HF checkpoint folder?")
    config = json.loads((path / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported(arch, f"checkpoint folder {path}")
    if arch in LLAMA_FAMILY:
        config = normalize_config(config, f"checkpoint folder {path}")
    tensors = {}
    for shard in _weight_files(path) if weights else ():
        # safetensors only: a .bin checkpoint is a pickle and can run code when loaded.
        for name, array in load_file(shard).items():
            # Integer entries are buffers, not weights (BERT's `position_ids` is an arange).
            if array.dtype.kind in "iub":
                continue
            tensors[name] = array.astype(np.float32)
    if weights and arch in LLAMA_FAMILY:
        check_tensors(config, tensors, f"checkpoint folder {path}")
    with _hub_offline():
        # trust_remote_code stays off: a folder's own Python never runs here.
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return PretrainedSource(hf_config=config, tensors=tensors, tokenizer=tokenizer)


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {index.name} are missing: {missing}")
        return [path / s for s in shards]
    raise CheckpointError(
        f"{path} has no model.safetensors or model.safetensors.index.json (.bin pickles are not loaded)"
    )


@contextlib.contextmanager
def _hub_offline():
    """Set HF_HUB_OFFLINE=1 for the duration, so a missing tokenizer file never hits the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
