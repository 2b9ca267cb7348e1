"""Pretrained checkpoints in, as HF-convention float32 numpy tensors: GGUF files and HF folders;
HF folders and PEFT adapters (LoRA, prompt, prefix, IA3) out; PEFT LoRA adapters back in."""

from ftlib.hf.checkpoint_source import (
    CheckpointError,
    PretrainedSource,
    UnsupportedArchitectureError,
    load_pretrained,
)
from ftlib.hf.gguf import load_gguf
from ftlib.hf.hf_folder import load_hf_folder
from ftlib.hf.llama_family import LLAMA_FAMILY
from ftlib.hf.peft_format import load_peft_adapter, lora_options, save_peft_adapter

__all__ = [
    "LLAMA_FAMILY",
    "CheckpointError",
    "PretrainedSource",
    "UnsupportedArchitectureError",
    "load_gguf",
    "load_hf_folder",
    "load_peft_adapter",
    "load_pretrained",
    "lora_options",
    "save_peft_adapter",
]
