"""KV-cache generation: greedy cached decoding equals greedy full recomputation
token for token on a left-padded batch of different prompt lengths (plain, LoRA,
prefix, prompt), equals each prompt decoded alone, seeded sampling, stop
tokens, the user errors, and the CLI on a trained tiny run."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import tiny_llama
from flax import nnx

from configs import default
from ftlib import generate as gen
from ftlib import peft
from ftlib.errors import FtlibError
from ftlib.models.llama import Llama

CFG = dataclasses.replace(tiny_llama.CFG, rope_theta=500.0)
PROMPTS = [[5, 9, 13, 2, 7, 7, 30], [11, 3], [40, 41, 42, 43, 1]]


def model_with(method, cfg=CFG):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    # Weights of std 0.2, not 0.02: a near-zero random model just repeats its input.
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim > 1:
            var[...] = 10 * var[...]
    if method == "base":
        return model
    c = default.get_config().peft
    c.method = method
    if method in ("prefix", "prompt"):
        c[method].num_virtual_tokens = 3
    peft.apply_method(model, c)
    if method == "lora":  # B starts at zero: make the adapters matter
        for _, m in nnx.iter_modules(model):
            if hasattr(m, "lora_b"):
                m.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), m.lora_b.shape)
    return model


@pytest.mark.parametrize("method", ["base", "lora", "prefix", "prompt"])
def test_cached_greedy_equals_full_recomputation(method):
    model = model_with(method)
    kw = dict(max_new_tokens=6, bucket=8)
    cached = gen.generate(model, PROMPTS, **kw)
    assert cached == gen.generate(model, PROMPTS, use_cache=False, **kw)
    assert [len(c) for c in cached] == [6, 6, 6]
    if method == "base":  # padding and batch-mates change nothing
        assert [gen.generate(model, [p], **kw)[0] for p in PROMPTS] == cached
        assert cached != gen.generate(model_with("prompt"), PROMPTS, **kw)


def test_cached_decoding_with_the_layer_loop_equals_the_scan():
    """The layer loop (a GPU's default) stacks each layer's KV cache as the scan does."""
    kw = dict(max_new_tokens=6, bucket=8)
    loop = model_with("lora", dataclasses.replace(CFG, scan_layers=False))
    assert gen.generate(loop, PROMPTS, **kw) == gen.generate(model_with("lora"), PROMPTS, **kw)


def test_seeded_sampling_and_stop_tokens():
    model = model_with("base")
    s = gen.Sampling(temperature=1.5, top_k=20, top_p=0.9)
    a = gen.generate(model, PROMPTS, 8, s, seed=1)
    assert a == gen.generate(model, PROMPTS, 8, s, seed=1, use_cache=False)
    assert a != gen.generate(model, PROMPTS, 8, s, seed=2)
    greedy = gen.generate(model, PROMPTS, 8)
    assert gen.generate(model, PROMPTS, 8, gen.Sampling(temperature=1.0, top_k=1)) == greedy
    stop = greedy[0][2]
    stopped = gen.generate(model, PROMPTS, 8, stop_ids=[stop])
    assert stopped == [row[: row.index(stop)] if stop in row else row for row in greedy]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    s = gen.Sampling(temperature=1.0, top_p=0.75)
    draws = {int(gen.sample(logits, jax.random.key(i), s)[0]) for i in range(200)}
    assert draws == {0, 1}


def test_user_errors():
    model = model_with("base")
    with pytest.raises(FtlibError, match="does not fit max_len=16"):
        gen.generate(model, PROMPTS, 10, bucket=8, max_len=16)
    with pytest.raises(FtlibError, match="every prompt needs at least one token"):
        gen.generate(model, [[1, 2], []], 4)
    with pytest.raises(FtlibError, match="max_new_tokens must be > 0"):
        gen.generate(model, PROMPTS, 0)


def fake_run(tmp_path, vocab_size=256):
    """A run directory as the trainer leaves it: config.json + the best trainable
    params (here: LoRA + an MLP prefix, perturbed so that they matter)."""
    from configs import tiny
    from ftlib.checkpoint import Checkpointer
    from ftlib.metrics import save_config
    from ftlib.models import build_model

    config = tiny.get_config("lora+prefix")
    config.model.vocab_size = vocab_size  # 256, not the tokenizer's 49152: fast (ids < 256)
    config.peft.prefix.num_virtual_tokens = 4
    config.peft.prefix.projection = True
    model, tokenizer = build_model(config.model, config.seed)
    mask = peft.apply_method(model, config.peft, config.seed)
    params = nnx.state(model, mask.filter)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, treedef.unflatten(noisy))
    save_config(config, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path), config.checkpoint)
    ckpt.save_best(7, nnx.state(model, mask.filter), {"step": 7})
    ckpt.close()
    return model, tokenizer


@pytest.mark.slow  # builds the model of a run: loads a tokenizer (transformers import)
def test_load_run_restores_the_best_params_and_folds_the_prefix(tmp_path):
    trained, tokenizer = fake_run(tmp_path)
    model, _, config = gen.load_run(str(tmp_path))
    assert config.peft.method == "lora+prefix"
    assert type(model.prefix).__name__ == "Prefix"  # folded for inference
    prompts = [[72, 101, 108, 108, 111], [5, 6, 7]]
    assert gen.generate(model, prompts, 4) == gen.generate(trained, prompts, 4)
    with pytest.raises(FtlibError, match="has no config.json"):
        gen.load_run(str(tmp_path / "nope"))


@pytest.mark.slow  # the same, plus two `python -m ftlib.generate` processes
def test_cli_prints_and_writes_completions(tmp_path):
    import json
    import subprocess
    import sys

    trained, tokenizer = fake_run(tmp_path, vocab_size=0)  # the tokenizer's
    prompt = "Review: a gem\nSentiment:"
    ids = tokenizer(prompt)["input_ids"]
    new = gen.generate(trained, [ids], 5, stop_ids=[tokenizer.eos_token_id])[0]
    want = tokenizer.decode(new, skip_special_tokens=True)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": prompt, "id": 1}) + "\n")
    cmd = [sys.executable, "-m", "ftlib.generate", f"--workdir={tmp_path}", "--max_new_tokens=5"]
    subprocess.run(
        [*cmd, f"--prompts={tmp_path / 'in.jsonl'}", f"--out={tmp_path / 'out.jsonl'}"],
        check=True,
    )
    out = json.loads((tmp_path / "out.jsonl").read_text())
    assert out == {"prompt": prompt, "id": 1, "completion": want}
    bad = subprocess.run([*cmd, "--prompt=x", "--max_len=8"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: prompt of")


_MESH_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import jax
from flax import nnx
from configs import default
from ftlib import sharding
from test_generate import PROMPTS, gen, model_with

c = default.get_config()
for method in ("lora", "prefix", "prompt"):
    model = model_with(method)
    want = gen.generate(model, PROMPTS, 5, bucket=8)
    for shape in ((2, 2, 2), (1, 4, 2)):
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, sharding.tree_shardings(state, mesh, c.sharding_rules)))
        assert not model.embed.embedding[...].sharding.is_fully_replicated
        got = gen.generate(model, PROMPTS, 5, bucket=8)
        assert got == want, (method, shape, got, want)
print("mesh generate ok")
"""


@pytest.mark.slow  # a subprocess with 8 fake CPU devices
def test_generate_with_sharded_params_matches_one_device():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh generate ok" in out.stdout
