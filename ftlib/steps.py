"""Pure step functions: the one train step every method uses, and eval steps.

Two objectives share them: 'causal_lm' (masked next-token NLL of a decoder) and
'sequence_classification' (cross-entropy of an encoder's class logits per row).

State is explicit: `TrainState` holds the trainable params and their optimizer
state; frozen params travel separately and are never differentiated, so
gradient work and optimizer memory scale with the trainable count only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ftlib.linear_cross_entropy import is_first_max, linear_cross_entropy
from ftlib.models import layer_stack
from ftlib.optim import apply_gradients

OBJECTIVES = ("causal_lm", "sequence_classification")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable params only
    opt_state: optax.OptState


def init_train_state(model: nnx.Module, mask, tx, frozen_dtype: str = ""):
    """Splits `model` by its trainable `mask` -> (graphdef, TrainState at step 0
    holding the trainable params and their optimizer state, frozen params). `tx` is
    optim.make_optimizer's optimizer, or any optax transformation.

    frozen_dtype (e.g. 'bfloat16') stores the frozen floating params in that dtype:
    for LoRA-style methods the base model is nearly all the memory, and layers cast
    weights to the compute dtype where they use them. Trainable params keep theirs."""
    graphdef, params, frozen = nnx.split(model, mask.filter, ...)
    if frozen_dtype:
        frozen = jax.tree.map(
            lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            frozen,
        )
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), frozen


def next_token_sums(model, h_BTD, batch, row_weight_B=None, max_targets: int = 0):
    """Sums of masked next-token NLL, correct predictions and target count.

    Position t predicts input_ids[t+1], weighted by loss_mask[t+1] where both lie in
    one segment (a row's last position, and a packed segment's, have no target). With
    max_targets > 0 only the first max_targets target positions of each row go through
    the LM head (the caller guarantees no row has more): for short completions such as
    class labels this skips almost all of the [B,T,V] logits. A plain LM head is fused with the loss
    (ftlib.linear_cross_entropy), so the logits never exist whole.
    """
    last = ((0, 0), (0, 1))
    targets_BT = jnp.pad(batch["input_ids"][:, 1:], last)
    # In a packed row, a segment's last position would predict the next one's first token.
    seg_BT = batch["segment_ids"]
    same_segment_BT = jnp.pad(seg_BT[:, 1:] == seg_BT[:, :-1], last)
    w_BT = jnp.pad(batch["loss_mask"][:, 1:].astype(jnp.float32), last) * same_segment_BT
    if max_targets:
        order_BK = jnp.argsort(-w_BT, axis=1, stable=True)[:, :max_targets]
        h_BTD = jnp.take_along_axis(h_BTD, order_BK[..., None], axis=1)
        targets_BT = jnp.take_along_axis(targets_BT, order_BK, axis=1)
        w_BT = jnp.take_along_axis(w_BT, order_BK, axis=1)
    if row_weight_B is not None:
        w_BT = w_BT * row_weight_B[:, None]
    head = getattr(model, "output_projection", lambda: None)()
    if head is not None:
        w, vocab_major, dtype = head
        nll, correct = linear_cross_entropy(
            h_BTD, w, targets_BT, w_BT, vocab_major=vocab_major, dtype=dtype
        )
    else:
        logits_BTV = model.logits(h_BTD).astype(jnp.float32)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
        nll = jnp.sum(nll_BT * w_BT)
        max_BT = jnp.max(logits_BTV, axis=-1)
        correct = jnp.sum(is_first_max(logits_BTV, max_BT, targets_BT) * w_BT)
    return {"nll": nll, "correct": correct, "tokens": jnp.sum(w_BT)}


def class_sums(model, batch, row_weight_B=None, rng=None):
    """Sums of the head's cross-entropy, correct predictions and rows (as `tokens`, the
    count every objective's metrics divide by) for a sequence classifier."""
    logits_BC = model(batch["input_ids"], batch["segment_ids"] > 0, rng=rng).astype(jnp.float32)
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"])
    correct_B = jnp.argmax(logits_BC, axis=-1) == batch["label"]
    w_B = jnp.ones_like(nll_B) if row_weight_B is None else row_weight_B
    return {
        "nll": jnp.sum(nll_B * w_B),
        "correct": jnp.sum(correct_B * w_B),
        "tokens": jnp.sum(w_B),
    }


def _hidden(model, batch, rng=None):
    return model.hidden(batch["input_ids"], batch["positions"], batch["segment_ids"], rng=rng)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")


def materialized(grads):
    """The gradients as buffers of their own. Under the GPU's layer loop the gradient of
    a stacked [layers, ...] param is the layers' products concatenated, and XLA fuses
    that concatenation into each consumer: the global-norm reductions reading it ran at
    10-55 GB/s, 73 ms of llama-1b's 296 ms bf16 step on an H100 (0.79x the step time
    with this barrier, benchmarks/README.md). Materializing costs one copy (not timed
    alone; at HBM bandwidth a few ms for 1.1B fp32 gradients).
    Under `lax.scan` the gradients are buffers already and the barrier changes nothing."""
    return jax.lax.optimization_barrier(grads)


def make_train_step(
    graphdef,
    tx,
    dropout_seed: int = 0,
    max_targets: int = 0,
    objective: str = "causal_lm",
):
    """(state, frozen, batch) -> (state, metrics). Jit it with the state donated.
    `tx` is as for init_train_state; optim.apply_gradients runs its update.
    Metrics: loss, grad_norm, tokens and token_accuracy (causal_lm) or accuracy."""
    _check_objective(objective)
    base_key = jax.random.key(dropout_seed)
    classify = objective == "sequence_classification"
    accuracy_name = "accuracy" if classify else "token_accuracy"

    def train_step(state: TrainState, frozen: nnx.State, batch):
        rng = jax.random.fold_in(base_key, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            if classify:
                sums = class_sums(model, batch, rng=rng)
            else:
                sums = next_token_sums(
                    model, _hidden(model, batch, rng), batch, max_targets=max_targets
                )
            return sums["nll"] / jnp.maximum(sums["tokens"], 1.0), sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = materialized(grads)
        params, opt_state, grad_norm = apply_gradients(tx, grads, state.opt_state, state.params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "tokens": sums["tokens"],
            accuracy_name: sums["correct"] / jnp.maximum(sums["tokens"], 1.0),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(graphdef, choice_token_ids=None, objective: str = "causal_lm"):
    """(params, frozen, batch) -> metric sums over the batch's real rows.

    sequence_classification: the head's cross-entropy and accuracy (class_sums).
    Label-word classification (choice_token_ids given; rows packed with per-row
    example slots, data.pipeline.eval_batches): the next-token distribution at each
    example's `choice_pos` scores each label word; `nll` is the gold label word's NLL.
    Otherwise: masked next-token NLL / accuracy over all completion tokens."""
    _check_objective(objective)

    @layer_stack.forward_only()  # nothing differentiates it: frozen weights read in place
    def eval_step(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        w_B = batch["weight"]
        if objective == "sequence_classification":
            return class_sums(model, batch, w_B)
        if choice_token_ids is None:
            return next_token_sums(model, _hidden(model, batch), batch, w_B)
        # Packed rows (data.pipeline.eval_batches): K example slots per row, each at the
        # position that predicts its label word; gathered per row, so rows stay sharded.
        h_BTD = _hidden(model, batch)
        h_BKD = jnp.take_along_axis(h_BTD, batch["choice_pos"][..., None], axis=1)
        w_BK, label_BK = batch["example_weight"], batch["label"]
        logp_BKV = jax.nn.log_softmax(model.logits(h_BKD).astype(jnp.float32), axis=-1)
        logp_BKC = logp_BKV[..., jnp.asarray(choice_token_ids)]
        gold_nll_BK = -jnp.take_along_axis(logp_BKC, label_BK[..., None], axis=-1)[..., 0]
        correct_BK = jnp.argmax(logp_BKC, axis=-1) == label_BK
        gold_token_BK = jnp.asarray(choice_token_ids)[label_BK]
        token_correct_BK = jnp.argmax(logp_BKV, axis=-1) == gold_token_BK  # whole vocab
        return {
            "nll": jnp.sum(gold_nll_BK * w_BK),
            "correct": jnp.sum(correct_BK * w_BK),
            "token_correct": jnp.sum(token_correct_BK * w_BK),
            "tokens": jnp.sum(w_BK),
        }

    return eval_step
