"""KV-cache generation: greedy cached decoding equals greedy full recomputation
token for token on a left-padded batch of different prompt lengths (plain, LoRA,
prefix, prompt), equals each prompt decoded alone, seeded sampling, stop
tokens, the user errors, and the CLI on a trained tiny run."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import default
from ftlib import generate as gen
from ftlib import peft
from ftlib.errors import FtlibError
from ftlib.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=500.0,
)
PROMPTS = [[5, 9, 13, 2, 7, 7, 30], [11, 3], [40, 41, 42, 43, 1]]


def model_with(method):
    model = Llama(CFG, rngs=nnx.Rngs(0))
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
