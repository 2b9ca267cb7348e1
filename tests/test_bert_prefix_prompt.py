"""Prefix and prompt tuning on the BERT encoder: the hooks follow HF PEFT (virtual
tokens shift positions; outputs cover only the real tokens), train in the shared
step with the classifier head, and match PEFT on a random BERT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_bert import CFG, hf_config, random_hf_tensors

from configs import minilm_rt_lora
from ftlib import masks, optim, peft, steps
from ftlib.errors import FtlibError
from ftlib.models.bert import BertClassifier, from_pretrained


def peft_cfg(method, n=3, **options):
    c = minilm_rt_lora.get_config().peft
    c.method = method
    c[method].num_virtual_tokens = n
    c[method].update(options)
    return c


@nnx.jit
def hidden(model, ids_BT, mask_BT):
    return model.hidden(ids_BT, mask_BT)


def test_prompt_of_word_embeddings_equals_running_on_those_words_first():
    """A soft prompt set to the word embeddings of tokens X gives the input the same
    hidden states as the text [X, input] does (positions and token types included)."""
    model = from_pretrained(hf_config(CFG), random_hf_tensors(CFG), num_labels=3)
    rng = np.random.default_rng(0)
    text, x = rng.integers(0, CFG.vocab_size, (3,)), rng.integers(0, CFG.vocab_size, (2, 7))
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    want = hidden(
        model,
        jnp.asarray(np.concatenate([np.tile(text, (2, 1)), x], 1)),
        jnp.asarray(np.concatenate([np.ones((2, 3), bool), mask], 1)),
    )[:, 3:]
    peft.apply_method(model, peft_cfg("prompt", n=3, init_token_ids=tuple(int(t) for t in text)))
    got = hidden(model, jnp.asarray(x), jnp.asarray(mask))
    assert got.shape == (2, 7, CFG.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "method,options", [("prefix", {}), ("prompt", {}), ("prefix", {"projection": True})]
)
def test_train_step_trains_only_virtual_tokens_and_head(method, options):
    model = BertClassifier(dataclasses.replace(CFG, pooling="mean"), rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg(method, **options))
    trainable = [p for p in mask.trainable if mask.trainable[p]]
    assert trainable and all(p.startswith((method + "/", "classifier/")) for p in trainable)
    ocfg = minilm_rt_lora.get_config().optim
    ocfg.learning_rate, ocfg.warmup_steps = 1e-2, 1
    tx = optim.make_optimizer(ocfg, 10)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    frozen_before = jax.tree.map(np.asarray, frozen)
    before = jax.tree.map(np.asarray, state.params)
    step = jax.jit(steps.make_train_step(graphdef, tx, objective="sequence_classification"))
    rng = np.random.default_rng(1)
    for _ in range(3):
        seg = np.ones((4, 8), np.int32)
        seg[0, 5:] = 0
        batch = dict(
            input_ids=rng.integers(0, CFG.vocab_size, (4, 8)).astype(np.int32),
            segment_ids=seg,
            label=rng.integers(0, CFG.num_labels, (4,)).astype(np.int32),
        )
        state, metrics = step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for (path, a), b in zip(nnx.to_flat_state(state.params), jax.tree.leaves(before)):
        assert np.abs(np.asarray(a[...]) - b).max() > 0, f"{masks.path_str(path)} did not train"


def test_too_many_positions_is_a_clear_error():
    model = BertClassifier(CFG, rngs=nnx.Rngs(0))  # 20 positions
    peft.apply_method(model, peft_cfg("prompt", n=6))
    with pytest.raises(FtlibError, match="positions"):
        model.hidden(jnp.zeros((1, 15), jnp.int32))


def test_prefix_init_from_text_needs_a_kv_cache():
    # Li & Liang's init reads the model's own keys/values of the text: an encoder has none.
    model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(FtlibError, match="need a decoder with a KV cache; BertClassifier"):
        peft.apply_method(model, peft_cfg("prefix", init_token_ids=(1, 2)))


@pytest.mark.slow  # imports torch, transformers and peft
def test_prompt_matches_hf_peft_sequence_classification():
    """Same final hidden states (real tokens) as HF PEFT's prompt tuning of the same
    random BertForSequenceClassification, from PEFT's own virtual tokens. (PEFT's
    prefix tuning cannot run on BERT with transformers 5: its BERT takes no
    past_key_values; ftlib's BERT prefix follows the behaviour it had, positions
    shifted by P.)"""
    import peft as hf_peft
    import torch
    import transformers

    hf_cfg = transformers.BertConfig(
        **{k: v for k, v in hf_config(CFG).items() if k != "model_type"}
    )
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()
    tensors = {k: v.numpy() for k, v in hf.state_dict().items() if not k.startswith("classifier")}
    model = from_pretrained(hf_config(CFG), tensors, num_labels=2)
    prompt_cfg = hf_peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    wrapped = hf_peft.get_peft_model(hf, prompt_cfg).eval()
    values = wrapped.get_prompt_embedding_to_save("default").numpy()
    peft.apply_method(model, peft_cfg("prompt", n=3))
    model.prompt.embedding[...] = jnp.asarray(values)
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = wrapped(
            input_ids=torch.from_numpy(x),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
        )
    want = out.hidden_states[-1].numpy()[:, -9:]
    got = hidden(model, jnp.asarray(x), jnp.asarray(mask.astype(bool)))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4)
