"""Evaluate a run on new data and report drift from its own final test metrics.

  python -m ftlib.evaluate --workdir=DIR --data=NEW.jsonl [--threshold=0.02]

The run's model (best params, see ftlib.restore) is evaluated with the run's own data
settings (format, fields, template, seq_len) on every row of NEW.jsonl; the metrics are
compared with the run's final test record in DIR/metrics.jsonl. DIR/drift_report.json holds
both, the deltas, and a warning for each metric that got worse by more than the threshold
(absolute: accuracy 0.90 -> 0.87 is a drop of 0.03).
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from ftlib import cli

# Metric -> the direction that is better; perplexity is exp(loss), so loss alone warns.
_BETTER = {"accuracy": "higher", "token_accuracy": "higher", "loss": "lower"}
REPORT = "drift_report.json"


def evaluate_drift(workdir, data_path: str, threshold: float = 0.02) -> dict:
    # Imported here, not at the top: jax reads XLA_FLAGS at import, after flag parsing.
    import jax
    from flax import nnx

    from ftlib import data, sharding
    from ftlib.errors import FtlibError
    from ftlib.metrics import read_metrics, run_dir
    from ftlib.restore import load_run
    from ftlib.trainer import Evaluator

    if not pathlib.Path(data_path).is_file():
        raise FtlibError(f"--data={data_path}: no such file")
    finals = [
        r for r in read_metrics(workdir) if r["split"] == "test" and r.get("event") == "final"
    ]
    if not finals:
        raise FtlibError(f"{workdir}/metrics.jsonl has no final test record; did the run finish?")
    run = load_run(workdir)
    data_cfg = run.config.data
    # Every row of the file in one split, read as the run read its own data.
    data_cfg.update(source="jsonl", path=str(data_path), split=[0.0, 0.0, 1.0])
    task = data.load_task(data_cfg, run.tokenizer)
    mesh = sharding.make_mesh(run.config.mesh)
    rules = tuple(tuple(r) for r in run.config.sharding_rules)
    graphdef, params, frozen = nnx.split(run.model, run.mask.filter, ...)
    params_sh = sharding.tree_shardings(params, mesh, rules)
    frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
    params, frozen = jax.device_put(params, params_sh), jax.device_put(frozen, frozen_sh)
    objective = (
        "sequence_classification" if data_cfg.format == "sequence_classification" else "causal_lm"
    )
    evaluate = Evaluator(
        task, graphdef, params_sh, frozen_sh, mesh, data_cfg.eval_batch_size, objective
    )
    new = evaluate(params, frozen, "test")
    report = drift(finals[-1], new, threshold)
    report.update(data=str(data_path), params=f"{run.restored} (step {run.step})")
    if jax.process_index() == 0:
        (run_dir(workdir) / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def drift(run_test: dict, new: dict, threshold: float) -> dict:
    """Per-metric run value, new value, delta (new - run) and whether it worsened past threshold."""
    metrics, warnings = {}, []
    for name, value in new.items():
        if name not in run_test or name not in (*_BETTER, "perplexity"):
            continue
        delta = value - run_test[name]
        worse = {"higher": -delta, "lower": delta}.get(_BETTER.get(name), 0.0)
        metrics[name] = {"run": run_test[name], "new": value, "delta": delta}
        if worse > threshold:
            warnings.append(
                f"{name} worsened by {worse:.4f} ({run_test[name]:.4f} -> {value:.4f}), "
                f"more than the threshold {threshold}"
            )
    count = "examples" if "examples" in new else "tokens"
    return {"threshold": threshold, count: new.get(count), "metrics": metrics, "warnings": warnings}


def table(report: dict) -> str:
    rows = [("metric", "run test", "new data", "delta")]
    rows += [
        (k, f"{m['run']:.4f}", f"{m['new']:.4f}", f"{m['delta']:+.4f}")
        for k, m in report["metrics"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(lines + [f"WARNING: {w}" for w in report["warnings"]])


def _define_flags():
    # Defined only when run as a program: tests import this module next to ftlib.export
    # and ftlib.generate, which define --workdir too.
    flags.DEFINE_string("workdir", None, "Run directory of train.py.", required=True)
    flags.DEFINE_string("data", None, "JSONL file in the run's data format.", required=True)
    flags.DEFINE_float("threshold", 0.02, "Warn when a metric worsens by more.")


def main():
    f = flags.FLAGS
    report = evaluate_drift(f.workdir, f.data, f.threshold)
    print(table(report))
    print(f"wrote {pathlib.Path(f.workdir) / REPORT}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
