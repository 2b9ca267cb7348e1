"""Sources: read `config.data` into a list of records (plain python dicts).

Every source returns the whole dataset in memory: the data this library fine-tunes on
(thousands to a few hundred thousand short rows) fits easily, and holding it all lets the
split be a pure function of each record.
"""

import csv
import json
import pathlib

import numpy as np

from ftlib.errors import FtlibError


class DataError(FtlibError):
    """Bad data or data config; the message names the file, line and field."""


def read_records(data_cfg) -> list[dict]:
    """The records of `data_cfg.source`, each checked for the fields the format reads."""
    fields = _required_fields(data_cfg)
    readers = {
        "rt_snippets": read_rt_snippets,
        "jsonl": lambda: read_jsonl(data_cfg.path, fields),
        "csv": lambda: read_csv(data_cfg.path, fields),
        "tfds": lambda: read_tfds(
            data_cfg.tfds_name, data_cfg.tfds_split, data_cfg.tfds_data_dir, fields
        ),
    }
    if data_cfg.source not in readers:
        raise DataError(f"data.source={data_cfg.source!r} is not one of {sorted(readers)}")
    return readers[data_cfg.source]()


def _required_fields(data_cfg) -> tuple[str, ...]:
    fields = {
        "text": (data_cfg.text_field,),
        "prompt_completion": (data_cfg.prompt_field, data_cfg.completion_field),
        "chat": (data_cfg.messages_field,),
        # The template may name any field; a missing one is reported when it is rendered.
        "classification": (data_cfg.label_field,),
        "sequence_classification": (data_cfg.text_field, data_cfg.label_field),
    }.get(data_cfg.format, ())
    return fields + ((data_cfg.id_field,) if data_cfg.id_field else ())


def read_rt_snippets() -> list[dict]:
    """Rotten Tomatoes snippets as {'id', 'text', 'score', 'label'}.

    label is 1 if the mean human score is > 0, else 0. Snippets whose mean score is exactly 0
    have no polarity and are dropped (37 of the 10,605, leaving 10,568).
    """
    # Imported here, not at the top: only this source needs the asset machinery.
    from ftlib.assets import asset_path

    path = asset_path("rt-snippets")
    records = []
    # newline="" hands us the raw CRLF endings, stripped below, so no line is split twice.
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(
                    f"{path}:{lineno}: expected id<TAB>score<TAB>text, got {len(parts)} columns"
                )
            rid, score, text = parts
            score = float(score)
            if score != 0:
                records.append({"id": rid, "text": text, "score": score, "label": int(score > 0)})
    return records


def read_jsonl(path: str, fields=()) -> list[dict]:
    """One JSON object per line; blank lines are skipped."""
    path = _existing(path, "jsonl")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            missing = [k for k in fields if k not in record]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing field {missing[0]!r} (the record has "
                    f"{sorted(record)}; set data.*_field to match)"
                )
            records.append(record)
    return records


def read_csv(path: str, fields=()) -> list[dict]:
    """A CSV file with a header row; every value is a string."""
    path = _existing(path, "csv")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [k for k in fields if k not in columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the header has {columns} "
                "(set data.*_field to match)"
            )
        return [dict(row) for row in reader]


def read_tfds(name: str, split: str, data_dir: str, fields=()) -> list[dict]:
    """A prepared TFDS dataset, read with `tfds.data_source` (which needs no TensorFlow)."""
    if not name:
        raise DataError("data.source=tfds needs data.tfds_name")
    import tensorflow_datasets as tfds  # Lazy: a slow import that only this source needs.

    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds raises many types, all meaning "cannot read it".
        raise DataError(f"tfds {name!r} split {split!r}: {e}") from None
    records = []
    for i in range(len(ds)):
        record = {k: _to_python(v) for k, v in ds[i].items()}
        missing = [k for k in fields if k not in record]
        if missing:
            raise DataError(
                f"tfds {name}[{split}] example {i}: missing feature {missing[0]!r} "
                f"(has {sorted(record)})"
            )
        records.append(record)
    return records


def _to_python(value):
    """TFDS features -> python str/int/float/list; bytes are decoded as UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _to_python(value.item()) if value.ndim == 0 else [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def _existing(path: str, kind: str) -> pathlib.Path:
    if not path:
        raise DataError(f"data.source={kind} needs data.path")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path={path!r}: no such file")
    return p
