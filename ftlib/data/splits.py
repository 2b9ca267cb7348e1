"""Deterministic train/val/test split by a hash of each record.

A record's split depends only on (split_seed, its key), never on its position or on the
other records, so appending rows to a file never moves an existing row between splits, and
identical rows always land together (no train/test leakage through duplicates).
"""

import hashlib
import json
import math

from ftlib.data.sources import DataError

SPLITS = ("train", "val", "test")


def record_key(record: dict, id_field: str) -> str:
    """The record's id if `id_field` is set, else its whole content (canonical JSON)."""
    if id_field:
        return str(record[id_field])
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key); stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check_ratios(ratios) -> tuple[float, float, float]:
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise DataError(
            f"data.split={ratios} must be three non-negative train/val/test ratios summing to 1"
        )
    return ratios


def split_records(records: list[dict], ratios, seed: int, id_field: str) -> dict[str, list]:
    """{'train', 'val', 'test'} -> records, each split keeping the records' input order.

    A split whose ratio is > 0 but that got no record is an error: training or evaluating
    on nothing would otherwise fail later, far from the cause.
    """
    ratios = check_ratios(ratios)
    bounds = (ratios[0], ratios[0] + ratios[1])
    out = {name: [] for name in SPLITS}
    for record in records:
        u = unit_hash(seed, record_key(record, id_field))
        out["train" if u < bounds[0] else "val" if u < bounds[1] else "test"].append(record)
    for name, ratio in zip(SPLITS, ratios):
        if ratio > 0 and not out[name]:
            counts = ", ".join(f"{k}={len(v)}" for k, v in out.items())
            raise DataError(
                f"split {name!r} is empty ({len(records)} records: {counts}); use more data, "
                f"raise its ratio in data.split={ratios}, or set it to 0"
            )
    return out
