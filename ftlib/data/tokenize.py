"""Records -> tokenized examples: `input_ids` and `loss_mask` (+ `label`, `choice_pos`).

sequence_classification (for encoders such as BERT) is the exception: the tokenizer's own
frame around the text ([CLS] text [SEP]), the class index in `label`, and an all-zero
loss_mask, as no token is a target; a classification head scores the whole row.

loss_mask[t] = 1 where input_ids[t] is a prediction target: the trainer predicts
input_ids[t + 1] from position t and weights that loss by loss_mask[t + 1].

Prompt and completion are tokenized separately and concatenated, so the completion's tokens
are exactly those of the completion alone (for classification: exactly the label word's
token that `choice_token_ids` scores). Each example starts with the special tokens the
tokenizer itself puts in front of a text (a bos for Llama-like tokenizers, [CLS] for BERT,
nothing for GPT-2); trailing ones (BERT's [SEP]) are not used. text and prompt_completion
end in an eos, chat as its template renders it; classification ends at its label token.

Truncation to seq_len (each truncated example is counted):
  text               keep the start.
  prompt_completion  keep the completion (cut its end only if it alone overflows) and drop
                     prompt tokens from the start, keeping the prompt's end next to it.
  classification     cut the end of the record's text field inside the rendered template,
                     so the template's frame ("Review: ... Sentiment:") survives intact;
                     found from the fast tokenizer's character offsets.
  chat               keep the start.
  sequence_classification  cut the text's end, keeping the special tokens around it.
"""

import numpy as np

from ftlib.data.sources import DataError

_SENTINEL = "\x00ftlib-text\x00"  # Marks where the text field sits in a rendered template.


def encode_records(records: list[dict], data_cfg, tokenizer) -> tuple[list[dict], int]:
    """(examples, number truncated) for `data_cfg.format`."""
    encoders = {
        "text": _encode_text,
        "prompt_completion": _encode_prompt_completion,
        "classification": _encode_classification,
        "chat": _encode_chat,
        "sequence_classification": _encode_sequence_classification,
    }
    if data_cfg.format not in encoders:
        raise DataError(f"data.format={data_cfg.format!r} is not one of {sorted(encoders)}")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("ftlib.data needs a fast (Rust) tokenizer: it uses offsets and batching")
    return encoders[data_cfg.format](records, data_cfg, tokenizer)


def choice_token_ids(data_cfg, tokenizer) -> np.ndarray:
    """int32[C]: the token of ' ' + each label word, whose logit scores that class."""
    ids = []
    for word in data_cfg.label_words:
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise DataError(
                f"label word {word!r}: {' ' + word!r} is {len(tokens)} tokens {pieces}, not one; "
                "choose single-token words in data.label_words"
            )
        ids.append(tokens[0])
    return np.asarray(ids, np.int32)


def _example(ids, mask, **extra) -> dict:
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    return {"input_ids": ids, "loss_mask": mask, **extra}


def _leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer's own call puts before any text."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []


def _trailing_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer's own call puts after a text (BERT's [SEP])."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return full[len(_leading_special_ids(tokenizer)) + len(bare) :]


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _tokenize(tokenizer, texts: list[str], offsets=False) -> dict:
    if not texts:  # The batch call rejects an empty list.
        return {"input_ids": [], "offset_mapping": []}
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)


def _check_room(seq_len: int, prefix: list[int]) -> None:
    # A completion token needs a position before it to be predicted from.
    if seq_len < len(prefix) + 2:
        raise DataError(f"data.seq_len={seq_len} leaves no room for a prompt and a completion")


def _encode_text(records, data_cfg, tokenizer):
    prefix, eos, seq_len = _leading_special_ids(tokenizer), _eos(tokenizer), data_cfg.seq_len
    texts = [str(r[data_cfg.text_field]) for r in records]
    examples, truncated = [], 0
    for body in _tokenize(tokenizer, texts)["input_ids"]:
        ids = (prefix + body + eos)[:seq_len]
        truncated += len(prefix) + len(body) + len(eos) > seq_len
        examples.append(_example(ids, [0] * len(prefix) + [1] * (len(ids) - len(prefix))))
    return examples, truncated


def _encode_prompt_completion(records, data_cfg, tokenizer):
    prompts = [str(r[data_cfg.prompt_field]) for r in records]
    completions = [str(r[data_cfg.completion_field]) for r in records]
    completion_ids = [c + _eos(tokenizer) for c in _tokenize(tokenizer, completions)["input_ids"]]
    prompt_ids = _tokenize(tokenizer, prompts)["input_ids"]
    return _join(tokenizer, data_cfg.seq_len, prompt_ids, [None] * len(prompts), completion_ids)


def _join(tokenizer, seq_len, prompt_ids, in_field, completion_ids, extras=None):
    """prefix + prompt + completion, loss on the completion, fitted into seq_len.

    in_field[i] is None (overflow is dropped from the prompt's start) or, per prompt token,
    whether it lies in the truncatable text field (overflow is dropped from the field's end).
    """
    prefix = _leading_special_ids(tokenizer)
    _check_room(seq_len, prefix)
    examples, truncated = [], 0
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        completion = completion[: seq_len - len(prefix) - 1]
        budget = seq_len - len(prefix) - len(completion)
        truncated += len(prompt) > budget or len(completion) < len(completion_ids[i])
        if len(prompt) > budget:
            prompt = _fit(prompt, in_field[i], budget)
        ids = prefix + prompt + completion
        mask = [0] * (len(prefix) + len(prompt)) + [1] * len(completion)
        examples.append(_example(ids, mask, **(extras[i] if extras else {})))
    return examples, truncated


def _fit(prompt: list[int], in_field: list[bool] | None, budget: int) -> list[int]:
    """Keeps `budget` (>= 1) of the longer prompt: the field's last tokens go, then the first."""
    keep = list(range(len(prompt)))
    if in_field is not None:
        inside = [i for i in keep if in_field[i]]
        excess = min(len(prompt) - budget, len(inside))
        dropped = set(inside[len(inside) - excess :])
        keep = [i for i in keep if i not in dropped]
    return [prompt[i] for i in keep[len(keep) - budget :]]


def _encode_classification(records, data_cfg, tokenizer):
    choices = choice_token_ids(data_cfg, tokenizer)
    rendered = [_render(data_cfg, r, i) for i, r in enumerate(records)]
    encoded = _tokenize(tokenizer, [p for p, _ in rendered], offsets=True)
    in_field = [
        None if span is None else [span[0] <= s < e <= span[1] for s, e in offs]
        for (_, span), offs in zip(rendered, encoded["offset_mapping"])
    ]
    labels = [
        _label_index(r[data_cfg.label_field], data_cfg.label_words, i)
        for i, r in enumerate(records)
    ]
    examples, truncated = _join(
        tokenizer,
        data_cfg.seq_len,
        encoded["input_ids"],
        in_field,
        [[int(choices[y])] for y in labels],
        [{"label": y} for y in labels],
    )
    for i, ex in enumerate(examples):  # The last prompt token's logits score the label words.
        if len(ex["input_ids"]) < 2:
            raise DataError(
                f"record {i}: no prompt token before its label word (an empty text with "
                f"data.prompt_template={data_cfg.prompt_template!r} and no BOS token)"
            )
        ex["choice_pos"] = len(ex["input_ids"]) - 2
    return examples, truncated


def _encode_sequence_classification(records, data_cfg, tokenizer):
    prefix, suffix = _leading_special_ids(tokenizer), _trailing_special_ids(tokenizer)
    budget = data_cfg.seq_len - len(prefix) - len(suffix)
    if budget < 1:
        raise DataError(f"data.seq_len={data_cfg.seq_len} leaves no room for the text")
    texts = [str(r[data_cfg.text_field]) for r in records]
    examples, truncated = [], 0
    for i, body in enumerate(_tokenize(tokenizer, texts)["input_ids"]):
        truncated += len(body) > budget
        ids = prefix + body[:budget] + suffix
        label = _label_index(records[i][data_cfg.label_field], data_cfg.label_words, i)
        examples.append(_example(ids, [0] * len(ids), label=label))
    return examples, truncated


def _render(data_cfg, record: dict, index: int) -> tuple[str, tuple[int, int] | None]:
    """(prompt, character span of the text field in it, or None if it is not there once)."""
    field, template = data_cfg.text_field, data_cfg.prompt_template
    try:
        if field in record:
            framed = template.format(**{**record, field: _SENTINEL})
            before, found, after = framed.partition(_SENTINEL)
            if found and _SENTINEL not in after:
                text = str(record[field])
                return before + text + after, (len(before), len(before) + len(text))
        return template.format(**record), None
    except (KeyError, IndexError) as e:
        raise DataError(
            f"record {index}: data.prompt_template names {e} but the record has {sorted(record)}"
        ) from None


def _label_index(value, label_words, index: int) -> int:
    """A class index from an int, an int-like string or float, or a label word."""
    if isinstance(value, str) and value in label_words:
        return list(label_words).index(value)
    try:
        y = int(value) if float(value) == int(float(value)) else -1
    except (TypeError, ValueError, OverflowError):
        y = -1
    if not 0 <= y < len(label_words):
        raise DataError(
            f"record {index}: label {value!r} is neither a class index in "
            f"[0, {len(label_words)}) nor one of data.label_words={tuple(label_words)}"
        )
    return y


def _encode_chat(records, data_cfg, tokenizer):
    """Loss on the assistant turns, found by rendering the conversation prefix by prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format=chat needs a tokenizer with a chat template")
    examples, truncated = [], 0
    for index, record in enumerate(records):
        messages = record[data_cfg.messages_field]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(
                f"record {index}: {data_cfg.messages_field!r} must be a list of "
                "{'role': ..., 'content': ...} messages"
            )
        ids = _chat_ids(tokenizer, messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The turn starts after the prompt that asks for it and ends where its render does.
            head = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
            upto = _chat_ids(tokenizer, messages[: i + 1])
            if upto[: len(head)] != head or ids[: len(upto)] != upto:
                raise DataError(
                    f"record {index}: the chat template does not render a conversation's "
                    "prefix as a prefix of its tokens, so assistant turns cannot be located"
                )
            mask[len(head) : len(upto)] = [1] * (len(upto) - len(head))
        truncated += len(ids) > data_cfg.seq_len
        examples.append(_example(ids[: data_cfg.seq_len], mask[: data_cfg.seq_len]))
    return examples, truncated


def _chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
    )
