"""What every pretrained-weights loader returns, and `load_pretrained`, which picks the loader."""

import dataclasses
import pathlib

import numpy as np
import transformers

from ftlib.errors import FtlibError

# model_type values; llama, mistral and qwen2 share ftlib.models.llama (see llama_family).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "bert")


class CheckpointError(FtlibError):
    """A checkpoint path or file that cannot be loaded as given."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint is a model family ftlib has no implementation of."""


def unsupported(arch: str, where: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{where} holds a {arch!r} model; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


@dataclasses.dataclass
class PretrainedSource:
    """Weights, config and tokenizer in Hugging Face's conventions, whatever the file format.

    Model code maps these names itself, so every loader produces the same keys and layouts
    as `transformers` would load from an HF folder.
    """

    hf_config: dict  # config.json-style keys: model_type, vocab_size, hidden_size, ...
    tensors: dict[str, np.ndarray]  # float32, HF PyTorch names and layouts (Linear: [out, in])
    tokenizer: transformers.PreTrainedTokenizerFast


def load_pretrained(spec: str, weights: bool = True) -> PretrainedSource:
    """Load an HF checkpoint folder, a `.gguf` file, or a shipped asset name (see ftlib.assets).

    weights=False loads config and tokenizer only (empty `tensors`).
    """
    # Imported here: each loader pulls in its own format library, and assets may fetch.
    from ftlib import assets
    from ftlib.hf.gguf import load_gguf
    from ftlib.hf.hf_folder import load_hf_folder

    path = pathlib.Path(spec).expanduser()
    if not path.exists() and spec in assets.ASSETS:
        path = assets.asset_path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{spec} does not exist; give an HF checkpoint folder, a .gguf file, or one of the "
            f"assets {', '.join(sorted(assets.ASSETS))}"
        )
    if path.is_dir():
        return load_hf_folder(path, weights)
    if path.suffix == ".gguf":
        return load_gguf(path, weights)
    raise CheckpointError(f"{path} is neither an HF checkpoint folder nor a .gguf file")
