"""Pretrained checkpoints in, as HF-convention float32 numpy tensors: GGUF files and HF folders."""

from ftlib.hf.checkpoint_source import (
    CheckpointError,
    PretrainedSource,
    UnsupportedArchitectureError,
    load_pretrained,
)
from ftlib.hf.gguf import load_gguf
from ftlib.hf.hf_folder import load_hf_folder
from ftlib.hf.llama_family import LLAMA_FAMILY

__all__ = [
    "LLAMA_FAMILY",
    "CheckpointError",
    "PretrainedSource",
    "UnsupportedArchitectureError",
    "load_gguf",
    "load_hf_folder",
    "load_pretrained",
]
