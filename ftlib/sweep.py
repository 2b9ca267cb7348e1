"""Run a config's sweep: `get_sweep()` returns a list of override dicts.

  python -m ftlib.sweep --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=V ...]

Each override dict (flattened keys, e.g. {'peft.lora.rank': 4}) runs after the
other into DIR/<run-name>/; DIR/results.csv and DIR/results.md collect the
overrides, best val metric, test metrics, trainable params, steps and wall
time. A run whose summary.json exists is not run again, so an interrupted
sweep resumes where it stopped (and an interrupted run resumes from its
checkpoint).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import re

from absl import flags
from ml_collections import config_flags

from ftlib import cli
from ftlib.errors import FtlibError


def run_name(overrides: dict) -> str:
    """Readable, filesystem-safe name: 'peft.lora.rank=4,optim.learning_rate=0.001'."""
    if not overrides:
        return "base"
    text = ",".join(f"{k}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)[:200]


def apply_overrides(config, overrides: dict):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            node, *path = config, *key.split(".")
            for part in path[:-1]:
                if part not in node:
                    raise FtlibError(f"sweep override {key!r}: config has no field {part!r}")
                node = node[part]
            if path[-1] not in node:
                raise FtlibError(f"sweep override {key!r}: config has no field {path[-1]!r}")
            node[path[-1]] = value
    return config


def load_sweep(config_path: str) -> list[dict]:
    path, _, arg = config_path.partition(":")
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise FtlibError(
            f"{path} defines no get_sweep(); add one returning a list of override dicts"
        )
    sweep = module.get_sweep(arg) if arg else module.get_sweep()
    if not sweep:
        raise FtlibError(f"{path}: get_sweep() returned no runs")
    return [dict(o) for o in sweep]


def result_row(overrides: dict, summary: dict, metric: str) -> dict:
    test = summary["test"]
    acc = "accuracy" if "accuracy" in test else "token_accuracy"
    return {
        "run": run_name(overrides),
        **overrides,
        f"best_val_{metric}": summary["best_val"],
        f"test_{acc}": test[acc],
        "test_loss": test["loss"],
        "trainable_params": summary["trainable_params"],
        "trainable_pct": round(100 * summary["trainable_params"] / summary["total_params"], 4),
        "checkpoint_bytes": summary.get("checkpoint_bytes"),
        "median_step_s": summary.get("median_step_s"),
        "peak_rss_mb": round(summary.get("peak_rss_mb") or 0, 1),
        "steps": summary["steps"],
        "wall_s": round(summary["wall_s"], 1),
    }


def write_results(workdir: pathlib.Path, rows: list[dict]):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # 5e-05 stays 5e-05
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")


def run_sweep(config, sweep: list[dict], workdir: str) -> list[dict]:
    from ftlib import peft
    from ftlib.trainer import train_and_evaluate

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = [(o, apply_overrides(config, o)) for o in sweep]  # bad keys fail before any run
    for overrides, run_config in configs:  # nor may a run set options of methods it lacks
        peft.check_config(run_config.peft, overrides)
    rows = []
    for i, (overrides, run_config) in enumerate(configs):
        run_dir = workdir / run_name(overrides)
        done = run_dir / "summary.json"
        print(f"[{i + 1}/{len(configs)}] {run_dir.name}")
        summary = (
            json.loads(done.read_text())
            if done.exists()
            else train_and_evaluate(run_config, str(run_dir))
        )
        rows.append(result_row(overrides, summary, run_config.eval.metric))
        write_results(workdir, rows)
    return rows


def _define_flags():
    # Defined only when run as a program: tests import this module next to train.py,
    # which defines --config and --workdir too.
    config_flags.DEFINE_config_file(
        "config", None, "Config file with get_sweep().", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Sweep directory.", required=True)


def main():
    f = flags.FLAGS
    sweep = load_sweep(config_flags.get_config_filename(f["config"]))
    run_sweep(f.config, sweep, f.workdir)
    print((pathlib.Path(f.workdir) / "results.md").read_text())


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
