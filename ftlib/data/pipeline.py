"""Examples -> fixed-dtype numpy batches: padding, packing, the grain training iterator.

Every batch has input_ids, loss_mask, segment_ids (1..n per example in a row, 0 = padding)
and positions (restarting at 0 per segment), all int32[B, T]; classification batches add
label and choice_pos int32[B]; eval batches add weight float32[B] (0 marks filler rows).
T is seq_len, or with pad_to_multiple > 0 the batch's longest row rounded up to a multiple of
it (capped at seq_len): short batches run faster while jit sees at most
seq_len / pad_to_multiple distinct shapes.
"""

import functools

import grain
import numpy as np

_ROW_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
_EXTRA_KEYS = ("label", "choice_pos")  # Classification only.
# Batching is cheap, so a few threads and a short buffer keep up without hogging the host.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def as_row(example: dict) -> dict:
    """One example as a row holding a single segment."""
    n = len(example["input_ids"])
    return {
        **example,
        "segment_ids": np.ones(n, np.int32),
        "positions": np.arange(n, dtype=np.int32),
    }


def _packed_row(packed: dict) -> dict:
    """grain's packed bin -> a row; bins are filled from the start, so cut the padding."""
    segment_ids = np.asarray(packed["input_ids_segment_ids"], np.int32)
    n = int(np.count_nonzero(segment_ids))
    return {
        "input_ids": packed["input_ids"][:n],
        "loss_mask": packed["loss_mask"][:n],
        "segment_ids": segment_ids[:n],
        "positions": np.asarray(packed["input_ids_positions"][:n], np.int32),
    }


def collate(rows: list[dict], *, pad_id: int, seq_len: int, pad_to_multiple: int,
            fill_to: int = 0) -> dict:
    """Pads rows into one batch; fill_to > 0 adds all-padding rows up to it, and `weight`."""
    longest = max(len(r["input_ids"]) for r in rows)
    t = seq_len
    if pad_to_multiple > 0:
        t = min(seq_len, -(-longest // pad_to_multiple) * pad_to_multiple)
    b = max(len(rows), fill_to)
    batch = {k: np.zeros((b, t), np.int32) for k in _ROW_KEYS}
    batch["input_ids"][:] = pad_id
    for i, row in enumerate(rows):
        for k in _ROW_KEYS:
            batch[k][i, : len(row[k])] = row[k]
    for k in _EXTRA_KEYS:
        if k in rows[0]:
            batch[k] = np.zeros(b, np.int32)
            batch[k][: len(rows)] = [r[k] for r in rows]
    if fill_to:
        batch["weight"] = (np.arange(b) < len(rows)).astype(np.float32)
    return batch


def train_iterator(examples: list[dict], batch_size: int, *, seed: int, pack: bool,
                   pad_id: int, seq_len: int, pad_to_multiple: int) -> grain.DatasetIterator:
    """An infinite iterator of training batches with get_state() / set_state().

    Each epoch is a fresh permutation (grain seeds the shuffle of epoch e with seed + e), and
    batches run across epoch boundaries. The state is a small dict of ints, JSON-safe.
    """
    ds = grain.MapDataset.source(examples).shuffle(seed).repeat()
    to_batch = functools.partial(
        collate, pad_id=pad_id, seq_len=seq_len, pad_to_multiple=pad_to_multiple
    )
    if not pack:
        ds = ds.map(as_row).batch(batch_size, batch_fn=to_batch)
        return iter(ds.to_iter_dataset(_READ_OPTIONS))
    # First-fit packing fills batch_size bins at a time, so rows hold several short examples
    # instead of padding; segment ids and positions keep the examples apart in attention.
    ds = ds.map(lambda ex: {"input_ids": ex["input_ids"], "loss_mask": ex["loss_mask"]})
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS),
        length_struct={"input_ids": seq_len, "loss_mask": seq_len},
        num_packing_bins=batch_size,
        seed=seed,
    )
    return iter(packed.map(_packed_row).batch(batch_size, batch_fn=to_batch))


def eval_batches(examples: list[dict], batch_size: int, *, pad_id: int, seq_len: int,
                 pad_to_multiple: int):
    """Finite batches in the examples' order; the last is filled up to batch_size rows."""
    for start in range(0, len(examples), batch_size):
        rows = [as_row(e) for e in examples[start : start + batch_size]]
        yield collate(rows, pad_id=pad_id, seq_len=seq_len, pad_to_multiple=pad_to_multiple,
                      fill_to=batch_size)
