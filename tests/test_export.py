"""ftlib.export on configs/tiny.py runs: merged HF folders that ftlib (and transformers,
where torch is installed) load with the run's logits, PEFT adapters that round-trip
through ftlib.hf.load_peft_adapter and keep training, and one-line refusals."""

import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import run_tiny

from configs import tiny
from ftlib import optim, peft, steps
from ftlib.errors import FtlibError
from ftlib.export import export
from ftlib.hf import load_pretrained
from ftlib.hf.peft_format import load_peft_adapter, lora_options, save_peft_adapter
from ftlib.models import build_model
from ftlib.models.llama import from_pretrained
from ftlib.restore import load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(0, 49152, (2, 9)).astype(np.int32)


def logits(model, ids=IDS):
    return np.asarray(model(jnp.asarray(ids)))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("lora") / "run", max_steps=8)


@pytest.fixture(scope="module")
def restored(lora_run):
    """The run rebuilt once for the tests that only read it."""
    return load_run(lora_run)


def test_hf_export_reloads_with_the_runs_logits(lora_run, restored, tmp_path):
    run = restored
    assert run.restored == "best" and run.step == 8
    b = run.model.blocks.attn.q_proj.lora_b.get_value()
    assert float(jnp.abs(b).max()) > 0  # trained: the merge changes the weights
    expected = logits(run.model)
    out = export(str(lora_run), "hf", str(tmp_path / "hf"))
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
    }
    src = load_pretrained(str(out))
    assert src.hf_config["model_type"] == "llama" and "lm_head.weight" not in src.tensors
    np.testing.assert_allclose(
        logits(from_pretrained(src.hf_config, src.tensors)), expected, atol=1e-4
    )
    with pytest.raises(FtlibError, match="is not empty"):
        export(str(lora_run), "hf", str(tmp_path / "hf"))


def test_peft_adapter_round_trip_keeps_training(restored, tmp_path):
    run = restored
    out = save_peft_adapter(run.model, run.config.peft.lora, tmp_path / "adapter", "base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16.0, "LORA")
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    c = copy.deepcopy(run.config)
    c.peft.lora.update(lora_options(out))
    model, _ = build_model(c.model, c.seed)
    mask = peft.apply_method(model, c.peft, seed=123)  # other random A: the load must set it
    load_peft_adapter(model, out)
    np.testing.assert_allclose(logits(model), logits(run.model), atol=1e-5)

    tx = optim.make_optimizer(c.optim, 20)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx))
    batch = {
        "input_ids": jnp.asarray(IDS),
        "loss_mask": jnp.ones(IDS.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape),
        "segment_ids": jnp.ones(IDS.shape, jnp.int32),
    }
    losses = [float(step(state, frozen, batch)[1]["loss"])]
    for _ in range(10):
        state, metrics = step(state, frozen, batch)
    assert float(metrics["loss"]) < losses[0] - 0.1


def test_peft_adapter_mismatches_are_named(restored, tmp_path):
    run = restored
    out = save_peft_adapter(run.model, run.config.peft.lora, tmp_path / "adapter", "base")
    c = copy.deepcopy(run.config)
    c.peft.lora.target_modules = ".*/(q|v)_proj"
    model, _ = build_model(c.model, c.seed)
    peft.apply_method(model, c.peft)
    with pytest.raises(FtlibError, match="tensors for modules the model's LoRA does not target"):
        load_peft_adapter(model, out)
    c.peft.lora.update(lora_options(out), rank=4)
    model, _ = build_model(c.model, c.seed)
    peft.apply_method(model, c.peft)
    with pytest.raises(FtlibError, match="scale 2.0 \\(r=8, alpha=16.0\\)"):
        load_peft_adapter(model, out)


def test_peft_format_refusals(lora_run, tmp_path):
    with pytest.raises(FtlibError, match="needs a run on an HF base folder"):
        export(str(lora_run), "peft", str(tmp_path / "p"))
    with pytest.raises(FtlibError, match="has no config.json"):
        export(str(tmp_path), "hf", str(tmp_path / "p"))


@pytest.mark.slow  # ~1 min on 2 busy cores; LoRA covers the export path by default
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_merged_hf_export_of_other_methods(tmp_path, method):
    """Any mergeable wrapper exports through peft.merge; trained-looking (random) adapter
    params make the merge non-trivial."""
    from ftlib.hf.hf_export import save_hf_folder

    c = tiny.get_config(method)
    model, tokenizer = build_model(c.model, c.seed)
    mask = peft.apply_method(model, c.peft)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if mask.trainable["/".join(map(str, path))]:
            noise = 0.1 * jax.random.normal(next(keys), var.shape)
            var.set_value(var.get_value() * (1 + noise) + noise)
    expected = logits(model)
    peft.merge(model)
    out = save_hf_folder(model, tokenizer, {}, tmp_path / "hf")
    src = load_pretrained(str(out))
    reloaded = logits(from_pretrained(src.hf_config, src.tensors))
    np.testing.assert_allclose(reloaded, expected, atol=1e-4)


def test_unmergeable_params_are_refused(tmp_path):
    from ftlib.hf.hf_export import save_hf_folder

    c = tiny.get_config("prompt")
    model, tokenizer = build_model(c.model, c.seed)
    peft.apply_method(model, c.peft)
    peft.merge(model)
    with pytest.raises(FtlibError, match="not prefix, prompt or bottleneck adapters"):
        save_hf_folder(model, tokenizer, {}, tmp_path / "out")


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ["-m", "ftlib.export", f"--workdir={tmp_path}", "--format=peft", "--out=x"]
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"error: {tmp_path} has no config.json" in out.stderr


# --- against transformers / peft (PyTorch) -------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    pytest.importorskip("torch")
    import tiny_hf

    model = tiny_hf.hf_model("llama", vocab_size=49152, tie_word_embeddings=False)
    return tiny_hf.save_hf(model, tmp_path_factory.mktemp("base") / "hf")


@pytest.mark.slow  # one more training run; test_hf_parity checks import -> export bit-exactness
def test_zero_step_run_exports_the_original_weights(hf_base, tmp_path):
    from safetensors.numpy import load_file

    workdir = run_tiny(tmp_path / "run", max_steps=0, checkpoint=str(hf_base))
    assert load_run(workdir).restored == "latest"
    out = export(str(workdir), "hf", str(tmp_path / "hf"))
    original, exported = (
        load_file(hf_base / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(exported) == sorted(original)
    for name, x in original.items():
        np.testing.assert_allclose(exported[name], x, atol=1e-6, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["rope_parameters"]
        == json.loads((hf_base / "config.json").read_text())["rope_parameters"]
    )


def test_transformers_and_peft_load_the_exports(hf_base, tmp_path):
    import peft as hf_peft
    import tiny_hf
    import torch
    import transformers

    workdir = run_tiny(tmp_path / "run", max_steps=6, checkpoint=str(hf_base))
    run = load_run(workdir)
    expected = logits(run.model)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        export(str(workdir), "hf", str(tmp_path / "hf"))
    )
    assert np.abs(tiny_hf.hf_logits(merged, IDS) - expected).max() <= 1e-4

    adapter = export(str(workdir), "peft", str(tmp_path / "peft"))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, adapter).eval()
    assert np.abs(tiny_hf.hf_logits(with_adapter, IDS) - expected).max() <= 1e-4
    with with_adapter.disable_adapter():  # the adapter matters: without it logits differ
        assert np.abs(tiny_hf.hf_logits(with_adapter, IDS) - expected).max() > 1e-3

    # And back: the folder peft itself writes loads into ftlib.
    with_adapter.save_pretrained(tmp_path / "resaved")
    c = copy.deepcopy(run.config)
    c.peft.lora.update(lora_options(tmp_path / "resaved"))
    model, _ = build_model(c.model, c.seed)
    peft.apply_method(model, c.peft, seed=5)
    load_peft_adapter(model, tmp_path / "resaved")
    np.testing.assert_allclose(logits(model), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_peft_loads_prompt_prefix_and_ia3_exports(hf_base, tmp_path, method):
    """A short run of each method on the HF base exports a folder that
    peft.PeftModel.from_pretrained loads with the run's logits."""
    import peft as hf_peft
    import tiny_hf
    import torch
    import transformers

    workdir = run_tiny(tmp_path / "run", max_steps=3, method=method, checkpoint=str(hf_base))
    run = load_run(workdir)
    expected = logits(run.model)
    adapter = export(str(workdir), "peft", str(tmp_path / "peft"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}.get(
        method, "IA3"
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, adapter).eval()
    # Prompt tuning's logits include the N soft tokens' positions: compare the real ones.
    got = tiny_hf.hf_logits(with_adapter, IDS)[:, -IDS.shape[1] :]
    assert np.abs(got - expected).max() <= 1e-4
    with with_adapter.disable_adapter():
        plain = tiny_hf.hf_logits(with_adapter, IDS)[:, -IDS.shape[1] :]
    assert np.abs(plain - expected).max() > 1e-3
    if method in ("prefix", "prompt"):
        with pytest.raises(FtlibError, match="use --format=peft for prefix and prompt"):
            export(str(workdir), "hf", str(tmp_path / "hf"))


def test_peft_prefix_export_folds_the_projection_mlp(hf_base, tmp_path):
    import peft as hf_peft
    import tiny_hf
    import torch
    import transformers

    from ftlib.hf.peft_format import save_peft

    c = tiny.get_config("prefix")
    c.peft.prefix.update(num_virtual_tokens=4, projection=True, projection_hidden=12)
    src = load_pretrained(str(hf_base))
    model = from_pretrained(src.hf_config, src.tensors)
    peft.apply_method(model, c.peft)
    expected = logits(model)
    adapter = save_peft(model, c.peft, tmp_path / "peft", str(hf_base))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with_adapter = hf_peft.PeftModel.from_pretrained(base, adapter).eval()
    assert np.abs(tiny_hf.hf_logits(with_adapter, IDS) - expected).max() <= 1e-4


def test_peft_format_refuses_other_and_composite_methods(tmp_path):
    for method in ("dora", "lora+prompt"):
        workdir = tmp_path / method
        workdir.mkdir()
        c = tiny.get_config(method)
        (workdir / "config.json").write_text(c.to_json())
        with pytest.raises(FtlibError, match=re.escape(f"this run used {method!r}")):
            export(str(workdir), "peft", str(tmp_path / "out"))
