"""HF folders saved by transformers' PyTorch models load into ftlib with the same logits
and loss: GQA, tied and untied embeddings, RoPE bases, Qwen2 q/k/v biases, sharded saves."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optax  # noqa: E402
import tiny_hf  # noqa: E402
import transformers  # noqa: E402

from ftlib.hf import CheckpointError, UnsupportedArchitectureError, load_pretrained  # noqa: E402


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", dict(tie_word_embeddings=True, rope_theta=5e5)),  # GQA, tied
        ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4, head_dim=16)),
        ("qwen2", dict(tie_word_embeddings=False, rope_theta=1e6)),  # q/k/v biases
        ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
        ("mistral", dict(tie_word_embeddings=False, rope_theta=2e4, sliding_window=None)),
    ],
)
def test_logits_and_loss_match_transformers(tmp_path, model_type, overrides):
    hf = tiny_hf.hf_model(model_type, **overrides)
    tiny_hf.save_hf(hf, tmp_path)
    model = tiny_hf.ftlib_model(tmp_path)
    ids = tiny_hf.token_ids(256)
    ref, ours = tiny_hf.hf_logits(hf, ids), tiny_hf.ftlib_logits(model, ids)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.5  # the logits are not all ~0, so the bound means something
    with torch.no_grad():
        hf_loss = hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss
    ours_loss = optax.softmax_cross_entropy_with_integer_labels(ours[:, :-1], ids[:, 1:]).mean()
    assert abs(float(ours_loss) - float(hf_loss)) <= 1e-5


def test_sharded_save_matches_single_file(tmp_path):
    hf = tiny_hf.hf_model("llama", tie_word_embeddings=False)
    tiny_hf.save_hf(hf, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = tiny_hf.token_ids(256)
    ours = tiny_hf.ftlib_logits(tiny_hf.ftlib_model(tmp_path / "sharded"), ids)
    assert np.abs(ours - tiny_hf.hf_logits(hf, ids)).max() <= 1e-4


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_unsupported_features_are_named(tmp_path):
    tiny_hf.save_hf(tiny_hf.hf_model("llama"), tmp_path)
    _edit_config(tmp_path, model_type="gemma")
    with pytest.raises(
        UnsupportedArchitectureError,
        match="'gemma' model; supported architectures: llama, mistral, qwen2, bert",
    ):
        load_pretrained(str(tmp_path))
    _edit_config(
        tmp_path,
        model_type="llama",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    )
    with pytest.raises(CheckpointError, match="RoPE scaling 'linear' is not supported"):
        load_pretrained(str(tmp_path))


def test_llama_attention_bias_is_refused(tmp_path):
    tiny_hf.save_hf(tiny_hf.hf_model("llama", attention_bias=True), tmp_path)
    with pytest.raises(CheckpointError, match="q/k/v/o biases\\) is not supported"):
        load_pretrained(str(tmp_path))


def test_wrong_shape_and_missing_tensors_are_named(tmp_path):
    tiny_hf.save_hf(tiny_hf.hf_model("llama", tie_word_embeddings=False), tmp_path)
    _edit_config(tmp_path, intermediate_size=48)
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), "
        r"the config implies \(48, 32\)",
    ):
        load_pretrained(str(tmp_path))
    _edit_config(tmp_path, intermediate_size=64, num_hidden_layers=3)
    with pytest.raises(
        CheckpointError, match="tensor model.layers.2.self_attn.q_proj.weight is missing"
    ):
        load_pretrained(str(tmp_path))
    _edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="tensors a llama model of this config does not use"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", dict(tie_word_embeddings=False, rope_theta=5e5)),
        ("qwen2", dict(tie_word_embeddings=True)),
        ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
    ],
)
def test_import_then_export_is_exact(tmp_path, model_type, overrides):
    from safetensors.numpy import load_file

    from ftlib.hf.hf_export import save_hf_folder

    tiny_hf.save_hf(tiny_hf.hf_model(model_type, **overrides), tmp_path / "in")
    src = load_pretrained(str(tmp_path / "in"))
    model = tiny_hf.ftlib_model(tmp_path / "in")
    save_hf_folder(model, src.tokenizer, src.hf_config, tmp_path / "out")
    original = load_file(tmp_path / "in" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(exported[name], x, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.model_type == model_type
    ids = tiny_hf.token_ids(256)
    assert np.abs(tiny_hf.hf_logits(reloaded, ids) - tiny_hf.ftlib_logits(model, ids)).max() <= 1e-4
