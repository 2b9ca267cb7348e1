"""Data for fine-tuning: `load_task(config.data, tokenizer)` -> a Task.

    task = load_task(data_cfg, tokenizer)   # read the source, split, tokenize
    task.examples["train" | "val" | "test"] # lists of example dicts
    task.choice_token_ids                   # int32[C] for classification, else None
    task.num_classes                        # C for both classification formats, else 0
    task.stats                              # counts per split, truncated, mean/max tokens
    it = task.train_iterator(batch_size)    # infinite grain iterator, get_state()/set_state()
    for batch in task.eval_batches("val", batch_size, max_examples=0): ...

Modules: sources (records from files / TFDS / the RT asset), splits (hash split),
tokenize (formats -> input_ids + loss_mask), pipeline (padding, packing, grain).
"""

import dataclasses

import numpy as np

from ftlib.data import pipeline
from ftlib.data.sources import DataError, read_records
from ftlib.data.splits import SPLITS, split_records
from ftlib.data.tokenize import choice_token_ids, encode_records

# Formats whose examples carry a class `label` (data.label_words names the classes).
CLASSIFICATION_FORMATS = ("classification", "sequence_classification")

__all__ = ["CLASSIFICATION_FORMATS", "DataError", "Task", "choice_token_ids", "load_task"]


@dataclasses.dataclass
class Task:
    """Tokenized splits of one dataset, and the batches made from them."""

    examples: dict[str, list[dict]]
    choice_token_ids: np.ndarray | None
    stats: dict
    pad_id: int
    seq_len: int
    pad_to_multiple: int
    pack: bool
    shuffle_seed: int
    group_by_length: int = 0
    num_classes: int = 0  # len(label_words) for the classification formats

    def train_iterator(self, batch_size: int):
        """Infinite shuffled training batches; iterator.get_state() is JSON-serialisable."""
        return pipeline.train_iterator(
            self.examples["train"],
            batch_size,
            seed=self.shuffle_seed,
            pack=self.pack,
            pad_id=self.pad_id,
            seq_len=self.seq_len,
            pad_to_multiple=self.pad_to_multiple,
            group_by_length=self.group_by_length,
        )

    def eval_batches(self, split: str, batch_size: int, max_examples: int = 0):
        """Finite batches of `split` (pipeline.eval_batches), packed for a causal LM.

        max_examples > 0 evaluates a fixed random subset of that size (not the first rows,
        whose order may follow the source's sorting), kept in the split's order.
        """
        examples = self.examples[split]
        if 0 < max_examples < len(examples):
            chosen = np.sort(np.random.default_rng(0).permutation(len(examples))[:max_examples])
            examples = [examples[i] for i in chosen]
        return pipeline.eval_batches(
            examples,
            batch_size,
            pad_id=self.pad_id,
            seq_len=self.seq_len,
            pad_to_multiple=self.pad_to_multiple,
            row_len=self.eval_row_len(),
            slots_per_row=self.eval_slots_per_row(split),
        )

    def eval_slots_per_row(self, split: str) -> int:
        """The most examples a packed row of `split` (or of any subset) can hold: the row
        length // the shortest example of val, test and `split`, so that val and test
        share one batch shape. Each slot costs a full-vocab logits row."""
        lengths = [len(e["input_ids"]) for s in {"val", "test", split} for e in self.examples[s]]
        return self.eval_row_len() // max(min(lengths, default=1), 1)

    def eval_row_len(self) -> int:
        """Tokens per packed eval row: the longest example of any split rounded up to
        pad_to_multiple (so that every split's batches share a shape), at most seq_len.
        0 for an encoder's class head, which reads one example per row (unpacked)."""
        if self.num_classes and self.choice_token_ids is None:
            return 0
        longest, multiple = self.stats["max_tokens"], self.pad_to_multiple
        return min(self.seq_len, -(-longest // multiple) * multiple) if multiple else self.seq_len


def load_task(data_cfg, tokenizer) -> Task:
    """Reads, splits and tokenizes `data_cfg`; raises DataError on bad input or config."""
    classes = len(data_cfg.label_words) if data_cfg.format in CLASSIFICATION_FORMATS else 0
    if data_cfg.pack and classes:
        raise DataError(
            f"data.pack=True does not apply to data.format={data_cfg.format} (one label per row)"
        )
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with")
    records = read_records(data_cfg)
    splits = split_records(records, data_cfg.split, data_cfg.split_seed, data_cfg.id_field)
    examples, truncated = {}, 0
    for name in SPLITS:
        examples[name], n = encode_records(splits[name], data_cfg, tokenizer)
        truncated += n
    lengths = np.array([len(e["input_ids"]) for split in examples.values() for e in split])
    stats = {
        **{name: len(examples[name]) for name in SPLITS},
        "truncated": truncated,
        "mean_tokens": float(lengths.mean()) if lengths.size else 0.0,
        "max_tokens": int(lengths.max()) if lengths.size else 0,
    }
    return Task(
        examples=examples,
        choice_token_ids=(
            choice_token_ids(data_cfg, tokenizer) if data_cfg.format == "classification" else None
        ),
        stats=stats,
        pad_id=pad_id,
        seq_len=data_cfg.seq_len,
        pad_to_multiple=data_cfg.pad_to_multiple,
        pack=data_cfg.pack,
        shuffle_seed=data_cfg.shuffle_seed,
        group_by_length=data_cfg.group_by_length,
        num_classes=classes,
    )
