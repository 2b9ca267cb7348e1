"""ftlib.hf: GGUF and HF-folder round trips on tiny random checkpoints, plus the real SmolLM2 (slow)."""

import json
import os

import gguf
import numpy as np
import pytest
import tokenizers
import transformers
from safetensors.numpy import save_file

from ftlib import assets
from ftlib.errors import FtlibError
from ftlib.hf import (
    CheckpointError,
    UnsupportedArchitectureError,
    load_gguf,
    load_hf_folder,
    load_pretrained,
)
from ftlib.hf.gguf import unpermute_rope_rows


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    """GGUF metadata entries in a folder of the test's own, so that the temporary files
    here do not push the real checkpoints' entries out of the user's cache."""
    from ftlib.hf import gguf as ftlib_gguf

    monkeypatch.setattr(ftlib_gguf, "cache_dir", lambda: tmp_path / "cache")
    ftlib_gguf._metadata.cache_clear()
    yield tmp_path / "cache" / "gguf-metadata"
    ftlib_gguf._metadata.cache_clear()


CFG = dict(
    vocab=None, hidden=32, ffn=64, layers=2, heads=4, kv_heads=2, theta=1e5, eps=1e-5, ctx=128
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def llama_cpp_permute(weights, n_head, n_head_kv):
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute), numpy instead of torch."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE tokens are spelled in."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# A tiny byte-level BPE: 3 control tokens, the 256 byte symbols, and merges for " pos" and "12".
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ p", "o s", "Ġp os", "1 2"]
TOKENS = CONTROL + list(bytes_to_unicode().values()) + ["Ġp", "os", "Ġpos", "12"]
TOKEN_TYPES = [3] * len(CONTROL) + [1] * (len(TOKENS) - len(CONTROL))


def random_hf_llama(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, hd = CFG["hidden"], CFG["ffn"], CFG["hidden"] // CFG["heads"]
    shapes = {"model.embed_tokens.weight": (len(TOKENS), d), "model.norm.weight": (d,)}
    for i in range(CFG["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (CFG["heads"] * hd, d),
            p + "self_attn.k_proj.weight": (CFG["kv_heads"] * hd, d),
            p + "self_attn.v_proj.weight": (CFG["kv_heads"] * hd, d),
            p + "self_attn.o_proj.weight": (d, CFG["heads"] * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    if not tied:
        shapes["lm_head.weight"] = (len(TOKENS), d)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_llama_gguf(path, hf: dict[str, np.ndarray], arch="llama", pre="smollm"):
    """Write `hf` the way llama.cpp's converter does: renamed, Q/K permuted, one tensor in Q8_0.

    Returns the tensors the loader should give back (Q8_0 is lossy, so that one is round-tripped).
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(CFG["layers"])
    w.add_context_length(CFG["ctx"])
    w.add_embedding_length(CFG["hidden"])
    w.add_feed_forward_length(CFG["ffn"])
    w.add_head_count(CFG["heads"])
    w.add_head_count_kv(CFG["kv_heads"])
    w.add_rope_freq_base(CFG["theta"])
    w.add_layer_norm_rms_eps(CFG["eps"])
    w.add_rope_dimension_count(CFG["hidden"] // CFG["heads"])
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    expected = dict(hf)
    for name, x in hf.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{layer[rest]}.weight"
        else:
            gname = names[name]
        if name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, CFG["heads"], CFG["heads"])
        elif name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, CFG["heads"], CFG["kv_heads"])
        if name == "model.layers.0.mlp.up_proj.weight":
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_gives_hf_tensors_and_config(tmp_path, tied):
    hf = random_hf_llama(tied)
    expected = write_llama_gguf(tmp_path / "tiny.gguf", hf)
    src = load_gguf(tmp_path / "tiny.gguf")
    assert sorted(src.tensors) == sorted(hf)
    for name, x in expected.items():
        assert (
            src.tensors[name].dtype == np.float32 and src.tensors[name].shape == hf[name].shape
        ), name
        np.testing.assert_array_equal(src.tensors[name], x, err_msg=name)
    # Q8_0 is lossy but close; every Q and K (un-permuted) comes back bit-exact above.
    np.testing.assert_allclose(
        expected["model.layers.0.mlp.up_proj.weight"],
        hf["model.layers.0.mlp.up_proj.weight"],
        atol=0.05,
    )
    c = src.hf_config
    assert c["model_type"] == "llama"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (len(TOKENS), 32, 64)
    assert (
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
    ) == (2, 4, 2, 8)
    assert (c["rms_norm_eps"], c["rope_theta"], c["max_position_embeddings"]) == (1e-5, 1e5, 128)
    assert c["tie_word_embeddings"] is tied
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 8 * 5, dtype=np.float32).reshape(12 * 8, 5)
    for n_head in (1, 3, 12):
        np.testing.assert_array_equal(
            unpermute_rope_rows(llama_cpp_permute(w, n_head, None), n_head), w
        )


def _rope_rotate_half(q_HD, pos):
    """HF Llama RoPE: dimension j rotates with j + D/2."""
    d = q_HD.shape[-1]
    ang = pos * 1e4 ** (-np.arange(d // 2) * 2 / d)
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    rotated = np.concatenate([-q_HD[..., d // 2 :], q_HD[..., : d // 2]], axis=-1)
    return q_HD * cos + rotated * sin


def _rope_interleaved(q_HD, pos):
    """llama.cpp's RoPE (GGML_ROPE_TYPE_NORMAL): dimension 2j rotates with 2j+1."""
    d = q_HD.shape[-1]
    ang = pos * 1e4 ** (-np.arange(d // 2) * 2 / d)
    x0, x1 = q_HD[..., 0::2], q_HD[..., 1::2]
    out = np.empty_like(q_HD)
    out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def test_unpermuted_weights_with_hf_rope_give_llama_cpp_attention_scores():
    """Why the un-permutation is needed: HF RoPE on un-permuted Q/K == llama.cpp RoPE on the file's."""
    rng = np.random.default_rng(1)
    heads, hd, d = 3, 8, 16
    wq_file = rng.standard_normal((heads * hd, d))  # rows as stored in the GGUF
    wk_file = rng.standard_normal((heads * hd, d))
    x_q, x_k = rng.standard_normal(d), rng.standard_normal(d)
    ref = [
        _rope_interleaved((wq_file @ x_q)[h * hd : (h + 1) * hd], 5)
        @ _rope_interleaved((wk_file @ x_k)[h * hd : (h + 1) * hd], 2)
        for h in range(heads)
    ]
    wq, wk = unpermute_rope_rows(wq_file, heads), unpermute_rope_rows(wk_file, heads)
    ours = [
        _rope_rotate_half((wq @ x_q)[h * hd : (h + 1) * hd], 5)
        @ _rope_rotate_half((wk @ x_k)[h * hd : (h + 1) * hd], 2)
        for h in range(heads)
    ]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    # Without it the scores are wrong: the check above is not vacuous.
    wrong = [
        _rope_rotate_half((wq_file @ x_q)[h * hd : (h + 1) * hd], 5)
        @ _rope_rotate_half((wk_file @ x_k)[h * hd : (h + 1) * hd], 2)
        for h in range(heads)
    ]
    assert not np.allclose(wrong, ref)


def test_gguf_tokenizer(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", random_hf_llama(tied=True))
    tok = load_gguf(tmp_path / "tiny.gguf").tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) == len(TOKENS)  # control tokens kept their ids, none appended
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.convert_ids_to_tokens(tok.encode(" pos")) == ["Ġpos"]
    assert tok.convert_ids_to_tokens(tok.encode("12")) == ["1", "2"]  # smollm splits digits first
    text = "Hé pos 12!\n\t<|im_end|> ünïcode 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_gguf_gpt2_pre_tokenizer_keeps_digit_merges(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", random_hf_llama(tied=True), pre="gpt2")
    tok = load_gguf(tmp_path / "tiny.gguf").tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("12")) == ["12"]


def test_gguf_unsupported_arch(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UnsupportedArchitectureError,
        match="holds a 'gpt2' model; supported architectures: llama, mistral, qwen2, bert",
    ):
        load_pretrained(str(tmp_path / "gpt2.gguf"))


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(CheckpointError, match="is not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )


def _hf_folder(path, model_type="bert", shards=1, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": model_type, "hidden_size": 4, "vocab_size": 4})
    )
    tensors = {
        "bert.embeddings.word_embeddings.weight": rng.standard_normal((4, 4)).astype(np.float16),
        "bert.encoder.layer.0.attention.self.query.weight": rng.standard_normal((4, 4)).astype(
            np.float32
        ),
        "bert.encoder.layer.0.attention.self.query.bias": rng.standard_normal(4).astype(np.float32),
        "bert.embeddings.position_ids": np.arange(4, dtype=np.int64)[None],
    }
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        names, weight_map = sorted(tensors), {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(path / shard))
            weight_map |= {n: shard for n in part}
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    _tiny_tokenizer().save_pretrained(path)
    return tensors


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_folder(tmp_path, monkeypatch, shards):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tensors = _hf_folder(tmp_path / "ckpt", shards=shards)
    src = load_pretrained(str(tmp_path / "ckpt"))
    assert src.hf_config["model_type"] == "bert"
    # Float tensors keep their stored names and come back as float32; the int buffer is dropped.
    assert sorted(src.tensors) == sorted(n for n in tensors if "position_ids" not in n)
    for name, x in src.tensors.items():
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, tensors[name].astype(np.float32))
    assert src.tokenizer("hello world")["input_ids"] == [2, 3]
    assert "HF_HUB_OFFLINE" not in os.environ  # set only while the tokenizer loads


def test_hf_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_pretrained(str(tmp_path / "noweights"))
    _hf_folder(tmp_path / "t5", model_type="t5")
    with pytest.raises(
        UnsupportedArchitectureError,
        match="holds a 't5' model; supported architectures: llama, mistral, qwen2, bert",
    ):
        load_pretrained(str(tmp_path / "t5"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="neither an HF checkpoint folder nor a .gguf file"):
        load_pretrained(str(tmp_path / "weights.bin"))
    assert issubclass(CheckpointError, FtlibError)


def test_missing_shard_is_named(tmp_path):
    _hf_folder(tmp_path / "ckpt", shards=2)
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: \\['model-00002-of-00002.safetensors'\\]"):
        load_hf_folder(tmp_path / "ckpt")


def test_load_pretrained_resolves_asset_names(tmp_path, monkeypatch):
    write_llama_gguf(tmp_path / "tiny.gguf", random_hf_llama(tied=True))
    monkeypatch.setattr(assets, "asset_path", lambda name: tmp_path / "tiny.gguf")
    assert load_pretrained("smollm2-135m-instruct").hf_config["num_hidden_layers"] == 2


@pytest.mark.slow
def test_real_smollm2_gguf():
    src = load_pretrained("smollm2-135m-instruct")
    c = src.hf_config
    assert (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    ) == (30, 576, 9, 3)
    assert (c["vocab_size"], c["head_dim"], c["intermediate_size"]) == (49152, 64, 1536)
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in src.tensors
    assert (c["rope_theta"], c["rms_norm_eps"]) == (1e5, 1e-5)
    assert src.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert src.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert sum(x.size for x in src.tensors.values()) == 134_515_008
    tok = src.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.encode(" positive") == [2731] and tok.encode(" negative") == [3524]
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", 2)


def _no_parse(path):
    raise AssertionError("parsed the file again")


def test_gguf_metadata_cache_keeps_the_most_recently_used(tmp_path, monkeypatch, gguf_cache):
    """Entries of files that are gone would pile up: beyond _CACHE_ENTRIES, the least
    recently used go (a read counts as a use)."""
    from ftlib.hf import gguf as ftlib_gguf

    monkeypatch.setattr(ftlib_gguf, "_CACHE_ENTRIES", 2)

    def load(name):
        path = tmp_path / f"{name}.gguf"
        if not path.exists():
            write_llama_gguf(path, random_hf_llama(tied=True))
        ftlib_gguf._metadata.cache_clear()
        before = set(gguf_cache.glob("*.json"))
        load_gguf(path, weights=False)
        return (set(gguf_cache.glob("*.json")) - before) or None

    [a], [b] = load("a"), load("b")
    os.utime(a, (100, 100))
    os.utime(b, (200, 200))
    assert load("a") is None and a.stat().st_mtime > 200  # read from the cache: used now
    [c] = load("c")
    assert set(gguf_cache.iterdir()) == {a, c}  # b was the least recently used


def test_gguf_metadata_cached_across_processes(tmp_path, monkeypatch, gguf_cache):
    """A load parses the file once; later processes (lru_cache cleared here) read the
    JSON copy, weights at its saved offsets. A corrupt copy is parsed again and rewritten."""
    from ftlib.hf import gguf as ftlib_gguf

    path = tmp_path / "tiny.gguf"
    expected = write_llama_gguf(path, random_hf_llama(tied=False))
    first = load_gguf(path)
    [saved] = gguf_cache.glob("*.json")
    for weights in (False, True):
        ftlib_gguf._metadata.cache_clear()
        with monkeypatch.context() as m:
            m.setattr(ftlib_gguf, "_reader", _no_parse)
            second = load_gguf(path, weights=weights)
        assert second.hf_config == first.hf_config
        text = "Hé pos 12!"
        assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tensors.keys() == first.tensors.keys() == expected.keys()
    for name, x in first.tensors.items():
        np.testing.assert_array_equal(second.tensors[name], x, err_msg=name)
        assert second.tensors[name].dtype == np.float32
    saved.write_text("{not json")
    ftlib_gguf._metadata.cache_clear()
    assert load_gguf(path, weights=False).hf_config == first.hf_config
    assert json.loads(saved.read_text())["meta"]


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_layouts_read_the_readers_tensors(tmp_path, endian):
    """Each tensor read at its saved layout (after a JSON round trip) is the reader's
    array, for float and quantized types in both byte orders; floats come back native."""
    from ftlib.hf import gguf as ftlib_gguf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 256)).astype(np.float32)
    q = gguf.GGMLQuantizationType
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=endian)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    for t in (q.BF16, q.Q8_0, q.Q4_1):
        w.add_tensor(t.name.lower(), gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    st = path.stat()
    _, layouts = ftlib_gguf._metadata(str(path), st.st_size, st.st_mtime_ns, 0, 0)
    ftlib_gguf._metadata.cache_clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ftlib_gguf, "_reader", _no_parse)
        _, saved = ftlib_gguf._metadata(str(path), st.st_size, st.st_mtime_ns, 0, 0)
    assert saved == layouts
    raw = np.memmap(path, np.uint8, mode="r")
    for layout, t in zip(saved, gguf.GGUFReader(path).tensors, strict=True):
        data = layout.data(raw)
        assert data.dtype.isnative and data.shape == t.data.shape, t.name
        np.testing.assert_array_equal(data, t.data, err_msg=t.name)
        deq = gguf.quants.dequantize(data, layout.type).astype(np.float32)
        tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2}.get(t.name, 0.3)
        np.testing.assert_allclose(deq, x, atol=tol, err_msg=t.name)


def test_gguf_metadata_entry_of_a_changed_file_is_not_used(tmp_path, monkeypatch, gguf_cache):
    """An entry is keyed by the file's size, times and inode, and checked against the
    header's hash: a file rewritten with its old size and mtime (`cp -p`) is parsed again."""
    from ftlib.hf import gguf as ftlib_gguf

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, random_hf_llama(tied=True))
    st = path.stat()
    first = ftlib_gguf._metadata(str(path), st.st_size, st.st_mtime_ns, 0, 0)
    data = bytearray(path.read_bytes())
    data[100:104] = b"ZZZZ"  # inside the metadata
    path.write_bytes(bytes(data))
    ftlib_gguf._metadata.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(ftlib_gguf, "_reader", _no_parse)
        with pytest.raises(AssertionError, match="parsed the file again"):
            ftlib_gguf._metadata(str(path), st.st_size, st.st_mtime_ns, 0, 0)
    assert first[1]  # the entry had layouts; the changed header made it unusable
