"""ftlib.evaluate: a run's own test rows reproduce its final test metrics (zero drift),
drift warnings follow each metric's direction, and the CLI writes drift_report.json."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from tiny_runs import run_tiny

from ftlib.data.splits import split_records
from ftlib.errors import FtlibError
from ftlib.evaluate import REPORT, drift, evaluate_drift
from ftlib.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("eval") / "run", max_steps=8)


def test_own_test_rows_give_zero_drift(run, tmp_path):
    config = json.loads((run / "config.json").read_text())["data"]
    rows = [json.loads(line) for line in pathlib.Path(config["path"]).read_text().splitlines()]
    test_rows = split_records(rows, config["split"], config["split_seed"], "")["test"]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in test_rows))

    report = evaluate_drift(run, str(path))
    final = [r for r in read_metrics(run) if r.get("event") == "final"][-1]
    assert report["examples"] == final["examples"] == len(test_rows)
    assert set(report["metrics"]) == {"loss", "perplexity", "accuracy", "token_accuracy"}
    for name, m in report["metrics"].items():
        assert m["run"] == final[name] and abs(m["delta"]) < 1e-5, name
    assert report["warnings"] == []
    assert json.loads((run / REPORT).read_text()) == report


def test_warnings_follow_each_metrics_direction():
    run = {"accuracy": 0.90, "token_accuracy": 0.5, "loss": 0.40, "perplexity": 1.49}
    new = {"accuracy": 0.87, "token_accuracy": 0.6, "loss": 0.41, "perplexity": 9.0}
    report = drift(run, new, threshold=0.02)
    assert report["metrics"]["accuracy"]["delta"] == pytest.approx(-0.03)
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith(
        "accuracy worsened by 0.0300 (0.9000 -> 0.8700)"
    )
    new = {**new, "accuracy": 0.95, "loss": 0.5}  # a gain is never a warning; a loss rise is
    assert [w.split()[0] for w in drift(run, new, 0.02)["warnings"]] == ["loss"]


def test_cli_prints_table_and_writes_report(run, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    data = json.loads((run / "config.json").read_text())["data"]["path"]
    cmd = [sys.executable, "-m", "ftlib.evaluate", f"--workdir={run}", f"--data={data}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "metric" in out.stdout
        and "accuracy" in out.stdout
        and f"wrote {run / REPORT}" in out.stdout
    )
    report = json.loads((run / REPORT).read_text())
    assert report["examples"] == 48 and report["data"] == data


def test_errors_name_the_problem(run, tmp_path):
    with pytest.raises(FtlibError, match="no such file"):
        evaluate_drift(run, str(tmp_path / "absent.jsonl"))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FtlibError, match="has no final test record"):
        evaluate_drift(tmp_path, str(tmp_path / "metrics.jsonl"))
