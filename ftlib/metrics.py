"""Run logging: DIR/metrics.jsonl (one JSON object per event), TensorBoard
event files in DIR, and the resolved config as DIR/config.json. DIR may be a
local path or a cloud URL such as gs://bucket/run (etils.epath)."""

from __future__ import annotations

import json
import math

import jax
from etils import epath
from tensorboardX import SummaryWriter


def run_dir(workdir) -> epath.Path:
    """The run directory as an epath.Path: local paths made absolute (orbax wants
    them so), URLs (gs://, s3://) kept as they are."""
    path = epath.Path(workdir)
    return path if "://" in str(workdir) else path.absolute()


class MetricsLogger:
    """Writes only on process 0 so multi-host runs log once."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = run_dir(workdir) / "metrics.jsonl"
        self.tb = SummaryWriter(str(workdir)) if self.active else None

    def write(self, step: int, split: str, **metrics):
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{split}/{k}", v, int(step))
        self.tb.flush()
        return record

    def close(self):
        if self.tb:
            self.tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_metrics(workdir: str) -> list[dict]:
    path = run_dir(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_config(config, workdir: str):
    if jax.process_index() == 0:
        (run_dir(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
