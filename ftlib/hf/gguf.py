"""Read a llama.cpp GGUF file into HF-convention float32 tensors, config and tokenizer.

GGUF stores what llama.cpp computes with, which differs from HF in three ways undone here:
tensor names, the row order of Q and K (permuted for interleaved RoPE), and a tokenizer kept
as raw vocabulary metadata rather than a `tokenizer.json`.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import tempfile

import gguf
import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

from ftlib.assets import cache_dir
from ftlib.hf.checkpoint_source import CheckpointError, PretrainedSource, unsupported

# llama.cpp name -> HF name; `{i}` is the layer index.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Cache entries of an older layout (tensor names only) get other keys and are not read.
_CACHE_FORMAT = "v2"
_CACHE_ENTRIES = 16  # entries kept, the most recently used
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|>, <|endoftext|>, ...

# How llama.cpp splits text before BPE, by `tokenizer.ggml.pre`; the merges were learned on
# pieces split this way, so a different split gives different (worse) token ids.
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "gpt2": lambda: _GPT2_SPLIT,
    "default": lambda: _GPT2_SPLIT,
    # StarCoder's tokenizer (SmolLM's too) first cuts every digit apart, then GPT-2's regex.
    **{
        name: lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]
        )
        for name in ("smollm", "starcoder", "refact", "codeshell")
    },
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}


def load_gguf(path, weights: bool = True) -> PretrainedSource:
    """Dequantize every tensor of a llama GGUF file to float32, with HF names and layouts.

    weights=False skips the dequantization (tokenizer and config only).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    st = path.stat()
    meta, layouts = _metadata(
        str(path.absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    )
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise unsupported(arch, f"GGUF file {path}")
    config = _config(meta, {t.name for t in layouts})
    tensors = _dequantized(path, st.st_size, layouts, config) if weights else {}
    return PretrainedSource(hf_config=config, tensors=tensors, tokenizer=_tokenizer(meta, path))


def _dequantized(path: pathlib.Path, size: int, layouts, config: dict) -> dict:
    """Every tensor as float32 under its HF name, read at its layout from the memory-mapped
    file, which must still have the size its layouts were read at."""
    try:
        raw = np.memmap(path, np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"GGUF file {path} cannot be read: {e}") from None
    if raw.size != size:
        raise CheckpointError(f"GGUF file {path} changed while it was loaded; load it again")
    tensors = {}
    for t in layouts:
        # Numpy (row-major) order, the reverse of GGUF's `shape`: exactly HF's [out, in]
        # for Linear weights and [V, D] for the embedding. np.array copies, so no tensor
        # keeps the memory-mapped file open.
        weight = np.array(gguf.quants.dequantize(t.data(raw), t.type), dtype=np.float32)
        name = _hf_name(t.name, path)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[name] = weight
    return tensors


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one tensor's stored (possibly quantized) data lies in the file, as the
    reader found it: byte offset, numpy dtype and shape (quantized blocks are uint8 rows)."""

    name: str
    type: int  # gguf.GGMLQuantizationType
    offset: int
    dtype: str  # with its byte order: a big-endian file's floats are '>f4'
    shape: tuple[int, ...]

    def data(self, raw: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        end = self.offset + int(np.prod(self.shape)) * dtype.itemsize
        if end > raw.size:  # only a damaged cache entry gets here: the header hash matched
            raise CheckpointError(
                f"GGUF tensor {self.name} lies past the end of the file: delete "
                f"{cache_dir() / 'gguf-metadata'} and load it again"
            )
        data = raw[self.offset : end]
        # gguf's dequantize views floats as native ones: convert a big-endian file's.
        return data.view(dtype).reshape(self.shape).astype(dtype.newbyteorder("="), copy=False)


def _reader(path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors/asserts on a bad file
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


@functools.lru_cache(maxsize=4)
def _metadata(path: str, *stat: int) -> tuple[dict, tuple[_Layout, ...]]:
    """Metadata and tensor layouts of an unchanged file (`stat`: size, mtime, ctime,
    inode), parsed once per process and kept as JSON under ftlib.assets.cache_dir()
    across processes: the reader takes 2-5 s over a 49k-token vocabulary, and every run,
    sweep and test loads the file in a fresh process. A saved entry is used only if the
    file's header (metadata and tensor offsets) still hashes the same. Callers must not
    mutate the returned dict."""
    folder = cache_dir() / "gguf-metadata"
    key = "|".join(map(str, (_CACHE_FORMAT, path, *stat)))
    cached = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(cached.read_text())
        layouts = tuple(
            _Layout(str(n), int(t), int(o), np.dtype(d).str, tuple(map(int, s)))
            for n, t, o, d, s in saved["tensors"]
        )
        if saved["header_sha256"] == _header_sha256(path, layouts):
            with contextlib.suppress(OSError):
                os.utime(cached)  # recently used: pruned last (_prune)
            return saved["meta"], layouts
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no usable cache entry: parse the file
    reader = _reader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    layouts = tuple(
        _Layout(t.name, int(t.tensor_type), int(t.data_offset), t.data.dtype.str, t.data.shape)
        for t in reader.tensors
    )
    entry = {
        "meta": meta,
        "tensors": [dataclasses.astuple(t) for t in layouts],
        "header_sha256": _header_sha256(path, layouts),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees all of it or nothing
        _prune(folder)
    except (OSError, TypeError, ValueError):
        pass  # a read-only cache, or metadata JSON cannot hold: parse again next time
    return meta, layouts


def _header_sha256(path: str, layouts) -> str:
    """Hash of the bytes before the first tensor: the metadata and every tensor's offset."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(min((t.offset for t in layouts), default=0))).hexdigest()


def _prune(folder: pathlib.Path) -> None:
    """Keeps the _CACHE_ENTRIES most recently used files: entries of files that are gone
    (a test's temporary files) and leftovers of interrupted writes would stay forever."""
    used = []
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):  # another process may have removed it
            used.append((entry.stat().st_mtime, entry))
    for _, entry in sorted(used, reverse=True)[_CACHE_ENTRIES:]:
        entry.unlink(missing_ok=True)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf.py's `permute(w, n_head, n_head_kv)`.

    HF's rotate-half RoPE pairs dimension j with j + head_dim/2 in each head; llama.cpp rotates
    adjacent pairs (2j, 2j+1), so the converter interleaves the two halves of each head's rows.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, path: pathlib.Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    raise CheckpointError(f"GGUF file {path} has tensor {name!r}, which a llama model does not use")


def _config(meta: dict, tensor_names: set[str]) -> dict:
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"GGUF RoPE scaling {scaling!r} is not supported")
    hidden = int(meta["llama.embedding_length"])
    n_heads = int(meta["llama.attention.head_count"])
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_heads)),
        "head_dim": int(head_dim) if head_dim is not None else hidden // n_heads,
        # GGUF stores float32: its shortest repr turns 9.999999747e-06 back into 1e-05.
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0)))),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
    }


def _tokenizer(meta: dict, path: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    """Rebuild the HF fast tokenizer from `tokenizer.ggml.*` (byte-level BPE only)."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF file {path}: tokenizer {kind!r} unsupported, only 'gpt2' (BPE)"
        )
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"GGUF file {path}: pre-tokenizer {pre!r} unsupported; known: {', '.join(_PRE_TOKENIZERS)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    # Tokens are already spelled in GPT-2's byte-to-unicode alphabet ('Ġ' for a space).
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or []
    # Control tokens must match whole, or '<|im_start|>' is split into '<', '|', 'im', ...
    # They are already in the vocabulary, so adding them keeps their ids.
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _TOKEN_TYPE_CONTROL
        ]
    )

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        # No pad token in the file: pad with EOS; padded positions are masked out anyway.
        pad_token=token("padding") or token("eos"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
