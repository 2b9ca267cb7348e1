"""KV-cache generation from a model or a training run's best checkpoint.

  python -m ftlib.generate --workdir=runs/default --prompt="Review: a gem\\nSentiment:"
  python -m ftlib.generate --workdir=DIR --prompts=in.jsonl --out=out.jsonl --temperature=0.7

Prompts are left-padded to a multiple of `bucket` and the cache holds the
virtual tokens (prefix, soft prompt) + that length + max_new_tokens, so prefill
and the one-token decode step each compile once per (batch, bucket, max_new)
shape. Sampling: greedy (temperature 0), or temperature with top-k / top-p,
seeded. Every PEFT method works: the model's prefix hook fills the first cache
slots and its soft prompt enters with the prefill. Under a mesh, pass a model
whose params are already sharded: the jitted functions follow them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from ftlib.errors import FtlibError
from ftlib.models import layer_stack


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set with this much probability; 1 = all


def sample(logits_BV, key, s: Sampling):
    """Next token per row [B]."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Drop a token when the more likely ones already reach top_p (keeps at least one).
        drop_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV >= s.top_p
        cutoff_B1 = jnp.min(jnp.where(drop_BV, jnp.inf, sorted_BV), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int, bucket: int):
    """-> (ids_BT, segment_ids_BT) numpy int32, T = longest prompt rounded up to `bucket`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise FtlibError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    T = -(-longest // bucket) * bucket
    ids = np.full((len(prompts), T), pad_id, np.int32)
    seg = np.zeros((len(prompts), T), np.int32)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = p
        seg[row, T - len(p) :] = 1
    return ids, seg


def _positions(seg_BT):
    return jnp.maximum(jnp.cumsum(seg_BT, axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
@layer_stack.forward_only()  # frozen weights read in place (LayerViews)
def _prefill(graphdef, state, ids_BT, seg_BT, key, max_new_tokens, sampling):
    model = nnx.merge(graphdef, state)
    h_BTD, cache = model.prefill(ids_BT, _positions(seg_BT), seg_BT, extra_slots=max_new_tokens)
    return sample(model.logits(h_BTD[:, -1]), jax.random.fold_in(key, 0), sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
@layer_stack.forward_only()  # frozen weights read in place (LayerViews)
def _decode(graphdef, state, cache, token_B, position_B, step, key, sampling):
    model = nnx.merge(graphdef, state)
    h_B1D, cache = model.decode(token_B[:, None], position_B[:, None], cache)
    return sample(model.logits(h_B1D[:, 0]), jax.random.fold_in(key, step), sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
@layer_stack.forward_only()  # frozen weights read in place (LayerViews)
def _recompute(graphdef, state, ids_BS, seg_BS, index, step, key, sampling):
    """The token after position `index` from the whole sequence, without a cache
    (the reference and the baseline). Slots after `index` are causally invisible,
    so one shape serves every step."""
    model = nnx.merge(graphdef, state)
    h_BSD = model.hidden(ids_BS, _positions(seg_BS), seg_BS)
    h_BD = jax.lax.dynamic_index_in_dim(h_BSD, index, 1, keepdims=False)
    return sample(model.logits(h_BD), jax.random.fold_in(key, step), sampling)


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int = 0,
    stop_ids=(),
    pad_id: int = 0,
    bucket: int = 16,
    max_len: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """New tokens per prompt, cut before the first stop token. max_len (0 = no
    limit) caps the sequence length: padded prompt + max_new_tokens.
    use_cache=False recomputes the whole sequence per token (for checks)."""
    if max_new_tokens <= 0:
        raise FtlibError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    ids_BT, seg_BT = left_pad(prompts, pad_id, bucket)
    T = ids_BT.shape[1]
    if max_len and T + max_new_tokens > max_len:
        raise FtlibError(
            f"prompt of {max(len(p) for p in prompts)} tokens (padded to {T}) + "
            f"max_new_tokens={max_new_tokens} does not fit max_len={max_len}"
        )
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    next_pos_B = jnp.asarray(seg_BT.sum(axis=1))
    if use_cache:
        token_B, cache = _prefill(graphdef, state, ids_BT, seg_BT, key, max_new_tokens, sampling)
    else:
        pad_BN = np.zeros((len(prompts), max_new_tokens), np.int32)
        ids_BS = jnp.asarray(np.concatenate([ids_BT, pad_BN], axis=1))
        seg_BS = jnp.asarray(np.concatenate([seg_BT, pad_BN + 1], axis=1))
        token_B = _recompute(graphdef, state, ids_BS, seg_BS, T - 1, 0, key, sampling)
    tokens = [token_B]
    done_B = jnp.isin(token_B, stops)
    for step in range(1, max_new_tokens):
        if bool(done_B.all()):
            break
        if use_cache:
            token_B, cache = _decode(
                graphdef, state, cache, token_B, next_pos_B + step - 1, step, key, sampling
            )
        else:
            ids_BS = ids_BS.at[:, T + step - 1].set(token_B)
            token_B = _recompute(graphdef, state, ids_BS, seg_BS, T - 1 + step, step, key, sampling)
        tokens.append(token_B)
        done_B = done_B | jnp.isin(token_B, stops)
    out = []
    for row in np.stack([np.asarray(t) for t in tokens], axis=1).tolist():
        cut = next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))
        out.append(row[:cut])
    return out


def load_run(workdir: str):
    """-> (model with the run's restored trainable params, tokenizer, run config)."""
    from ftlib import restore
    from ftlib.peft import prefix

    run = restore.load_run(workdir)
    if not hasattr(run.model, "decode"):
        raise FtlibError(
            f"{workdir} trained a {type(run.model).__name__}, not a causal LM: nothing to generate"
        )
    prefix.fold(run.model)  # the MLP reparameterisation is for training only
    return run.model, run.tokenizer, run.config


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, as the user turn of the chat template
    followed by the assistant's generation prompt."""
    if not chat:
        return tokenizer(text)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise FtlibError("--chat needs a tokenizer with a chat template")
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
    )


def _define_flags():
    # Defined only when run as a program: importing this module (tests, the
    # benchmark) next to ftlib.sweep must not register --workdir twice.
    flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
    flags.DEFINE_string("prompts", None, "JSONL file with a 'prompt' field per line.")
    flags.DEFINE_string("out", None, "JSONL output: each input record + 'completion'.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = all.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum(
        "chat", "auto", ["auto", "yes", "no"], "Chat template; auto = if the run trained on chat."
    )
    flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")
    flags.DEFINE_integer("max_len", 0, "Cap on padded prompt + new tokens; 0 = none.")


def main():
    f = flags.FLAGS
    if bool(f.prompt) == bool(f.prompts):
        raise FtlibError("give --prompt (one or more) or --prompts=FILE.jsonl, not both")
    if f.prompts:
        lines = pathlib.Path(f.prompts).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        if not all(isinstance(r, dict) and "prompt" in r for r in records):
            raise FtlibError(f"{f.prompts}: every line needs a 'prompt' field")
    else:
        records = [{"prompt": p} for p in f.prompt]
    model, tokenizer, config = load_run(f.workdir)
    chat = f.chat == "yes" or (f.chat == "auto" and config.data.format == "chat")
    sampling = Sampling(f.temperature, f.top_k, f.top_p)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    outputs = []
    for start in range(0, len(records), f.batch_size):
        chunk = records[start : start + f.batch_size]
        prompts = [encode(tokenizer, r["prompt"], chat) for r in chunk]
        new = generate(
            model,
            prompts,
            f.max_new_tokens,
            sampling,
            seed=f.seed + start,
            stop_ids=stop_ids,
            pad_id=pad_id,
            max_len=f.max_len,
        )
        for record, ids in zip(chunk, new):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append({**record, "completion": completion})
            if not f.out:
                print(f"{record['prompt']}{completion}\n---")
    if f.out:
        with open(f.out, "w") as out:
            out.writelines(json.dumps(o) + "\n" for o in outputs)


if __name__ == "__main__":
    from ftlib import cli

    _define_flags()
    cli.run(main)
