"""Evaluation packs a causal LM's examples into shared rows (data.pipeline.eval_batches):
its metrics equal those of the model run on one example per row, for label-word
classification and next-token loss, with and without virtual tokens (prompt, prefix)."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
import tiny_llama
from flax import nnx

from configs import default
from ftlib import peft, sharding
from ftlib.data import Task
from ftlib.models.llama import Llama
from ftlib.steps import init_train_state
from ftlib.trainer import Evaluator

CFG = dataclasses.replace(tiny_llama.CFG, rope_theta=500.0)
CHOICES = np.array([5, 9], np.int32)  # the label words' token ids


def one_per_row(model, exs, classify: bool) -> dict:
    """The metrics from the model run on one example per row (right-padded, causal: the
    padding changes nothing before it)."""
    ids_BT = np.zeros((len(exs), 32), np.int32)
    for b, e in enumerate(exs):
        ids_BT[b, : len(e["input_ids"])] = e["input_ids"]
    logp_BTV = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(model, ids_BT), axis=-1))
    nll = correct = count = 0.0
    for e, logp_TV in zip(exs, logp_BTV):
        if classify:
            logp_C = logp_TV[e["choice_pos"], CHOICES]
            nll -= logp_C[e["label"]]
            correct += np.argmax(logp_C) == e["label"]
            count += 1
            continue
        targets = e["input_ids"][1:]
        scored = e["loss_mask"][1:] > 0
        logp_tV = logp_TV[: len(targets)]
        nll -= logp_tV[np.arange(len(targets)), targets][scored].sum()
        correct += (np.argmax(logp_tV, axis=-1) == targets)[scored].sum()
        count += scored.sum()
    return {"loss": nll / count, "accuracy": correct / count}


@pytest.mark.parametrize(
    "method,classify", [("lora", True), ("prompt", True), ("lora", False), ("prefix", False)]
)
def test_packed_eval_equals_one_example_per_row(method, classify):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    c = default.get_config().peft
    c.method = method
    if method != "lora":
        c[method].num_virtual_tokens = 3
    mask = peft.apply_method(model, c)
    exs = tiny_llama.label_word_examples(30, CHOICES, every_token=not classify)
    task = Task(
        examples={"train": [], "val": exs, "test": []},
        choice_token_ids=CHOICES if classify else None,
        stats={"max_tokens": max(len(e["input_ids"]) for e in exs)},
        pad_id=0,
        seq_len=32,
        pad_to_multiple=8,
        pack=False,
        shuffle_seed=0,
        num_classes=2 if classify else 0,
    )
    rows = sum(int(b["weight"].sum()) for b in task.eval_batches("val", 4))
    assert rows < 2 / 3 * len(exs)  # rows are shared

    graphdef, state, frozen = init_train_state(model, mask, optax.sgd(0.0))
    mesh = sharding.make_mesh(default.get_config().mesh)
    rules = tuple(default.get_config().sharding_rules)
    evaluate = Evaluator(
        task,
        graphdef,
        sharding.tree_shardings(state.params, mesh, rules),
        sharding.tree_shardings(frozen, mesh, rules),
        mesh,
        4,
        "causal_lm",
    )
    got = evaluate(state.params, frozen, "val")
    want = one_per_row(nnx.merge(graphdef, state.params, frozen), exs, classify)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    accuracy = got["accuracy"] if classify else got["token_accuracy"]
    assert accuracy == pytest.approx(want["accuracy"], abs=1e-9)
    if classify:
        assert got["examples"] == len(exs)
