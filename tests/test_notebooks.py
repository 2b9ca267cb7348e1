"""notebooks/methods.ipynb runs top to bottom on a results file in the sweep's
format (written here with ftlib.sweep.write_results), so it never rots."""

import json
import pathlib

import pytest

from ftlib.sweep import write_results

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_notebook(path: pathlib.Path, env: dict, monkeypatch) -> dict:
    """Executes the code cells in order in one namespace (what 'Run all' does)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    return namespace


def test_methods_notebook(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    rows = [
        {
            "run": f"peft.method={m}",
            "peft.method": m,
            "best_val_accuracy": acc,
            "test_accuracy": acc,
            "test_loss": 0.4,
            "trainable_params": n,
            "trainable_pct": 100 * n / 1e6,
            "checkpoint_bytes": 4 * n,
            "median_step_s": t,
            "peak_rss_mb": 900.0,
            "steps": 10,
            "wall_s": 12.0,
        }
        for m, acc, n, t in [("full", 0.86, 1_000_000, 0.9), ("lora", 0.85, 9_000, 0.5)]
    ]
    write_results(tmp_path, rows)
    figure = tmp_path / "methods.png"
    ns = run_notebook(
        ROOT / "notebooks" / "methods.ipynb",
        {"FTLIB_RESULTS": str(tmp_path / "results.csv"), "FTLIB_FIGURE": str(figure)},
        monkeypatch,
    )
    (sweep,) = ns["sweeps"].values()
    assert [r["method"] for r in sweep] == ["full", "lora"]
    assert sweep[1]["trainable"] == 9_000 and sweep[0]["accuracy"] == 0.86
    assert figure.stat().st_size > 10_000
