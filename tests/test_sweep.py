"""Sweeps: overrides -> runs -> results.csv / results.md; finished runs are skipped."""

import csv
import subprocess
import sys

import pytest

from configs import tiny
from ftlib import sweep
from ftlib.errors import FtlibError


def small_config():
    c = tiny.get_config()
    c.max_steps = 3
    c.eval.every = 3
    c.eval.max_examples = 32
    return c


def test_sweep_runs_writes_results_and_resumes(tmp_path, monkeypatch):
    overrides = [{"optim.learning_rate": 1e-3}, {"optim.learning_rate": 1e-2, "seed": 1}]
    rows = sweep.run_sweep(small_config(), overrides, str(tmp_path))
    assert [r["run"] for r in rows] == [
        "optim.learning_rate=0.001",
        "optim.learning_rate=0.01,seed=1",
    ]
    for r in rows:
        assert (tmp_path / r["run"] / "metrics.jsonl").exists()
        assert r["steps"] == 3 and r["trainable_params"] > 0
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and float(table[1]["optim.learning_rate"]) == 0.01
    assert "test_accuracy" in table[0] and "best_val_loss" in table[0]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| run |") and len(md) == 4

    def must_not_train(*_):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("ftlib.trainer.train_and_evaluate", must_not_train)
    assert sweep.run_sweep(small_config(), overrides, str(tmp_path)) == rows


def test_bad_override_fails_before_any_run(tmp_path):
    with pytest.raises(FtlibError, match="sweep override 'optim.lr': config has no field 'lr'"):
        sweep.run_sweep(small_config(), [{"seed": 1}, {"optim.lr": 1.0}], str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_config_sweeps_are_valid():
    for module in (tiny,):
        for overrides in module.get_sweep():
            sweep.apply_overrides(module.get_config(), overrides)
    from configs import default

    for overrides in default.get_sweep():
        sweep.apply_overrides(default.get_config(), overrides)


@pytest.mark.slow
def test_sweep_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftlib.sweep",
            "--config=configs/tiny.py",
            f"--workdir={tmp_path}",
            "--config.max_steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "results.md").read_text().count("\n") == 2 + len(tiny.get_sweep())
