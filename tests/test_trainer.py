"""The whole loop on configs/tiny.py: overfitting one batch, the CLI, resume
after SIGTERM equal to an uninterrupted run, and one-line user errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from ftlib import adapters, data, optim, peft, restore, steps
from ftlib.metrics import read_metrics
from ftlib.models import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_overfits_one_batch():
    c = tiny.get_config()
    model, tokenizer = build_model(c.model, c.seed)
    task = data.load_task(c.data, tokenizer)
    mask = peft.apply_method(model, c.peft)
    tx = optim.make_optimizer(c.optim, 100)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx))
    batch = next(task.train_iterator(c.data.batch_size))
    for _ in range(100):
        state, metrics = step(state, frozen, batch)
    assert float(metrics["loss"]) < 0.1


def test_cli_tiny_run_improves_val_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # keep every compile
    cache = tmp_path.parent / f"{tmp_path.name}-xla"
    out = run_cli(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}",
        "--config.max_steps=20",
        f"--config.compilation_cache={cache}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(cache.glob("jit_train_step-*-cache")), "the run's compiled step is cached"
    records = read_metrics(tmp_path)
    val = [r["loss"] for r in records if r["split"] == "val"]
    assert len(val) == 2 and val[-1] < val[0]
    test = [r for r in records if r["split"] == "test"]
    assert test[-1]["event"] == "final" and 0.0 <= test[-1]["accuracy"] <= 1.0
    assert {"step", "split", "loss"} <= set(records[0])
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 20
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "fine-tuned test accuracy" in out.stdout


def _final_params(workdir):
    import orbax.checkpoint as ocp

    latest = pathlib.Path(workdir) / "checkpoints" / "latest"
    step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    restored = ocp.PyTreeCheckpointer().restore(latest / str(step) / "state")
    return step, restored["params"]


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    args = [
        "--config=configs/tiny.py",
        "--config.max_steps=30",
        "--config.checkpoint.every=5",
        "--config.peft.method=lora",
        "--config.peft.lora.dropout=0.1",
    ]
    # The uninterrupted run goes beside the one to be killed (they share no files).
    straight = run_cli(*args, f"--workdir={tmp_path / 'a'}", wait=False)
    work = tmp_path / "b"
    proc = run_cli(*args, f"--workdir={work}", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= 12 and r["split"] == "train" for r in read_metrics(work)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "SIGTERM: saved step" in output, output[-2000:]
    straight_output = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, straight_output[-3000:]
    stopped_at = int(output.split("SIGTERM: saved step ")[1].split()[0])
    assert 12 <= stopped_at < 30
    resumed = run_cli(*args, f"--workdir={work}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout

    def comparable(records):
        return [
            (r["step"], r["split"], round(r["loss"], 5))
            for r in records
            if r["split"] in ("val", "test")
        ]

    assert comparable(read_metrics(work)) == comparable(read_metrics(tmp_path / "a"))
    step_a, params_a = _final_params(tmp_path / "a")
    step_b, params_b = _final_params(work)
    assert step_a == step_b == 30
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)

    # The run's adapter file (its best params) loads onto a fresh base + surgery.
    run = restore.load_run(work)
    fresh, _ = build_model(run.config.model, run.config.seed)
    peft.apply_method(fresh, run.config.peft, seed=1)  # other random adapter init
    adapters.load_adapter(fresh, work / "adapter", run.config.peft)
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.state(fresh, run.mask.filter),
        nnx.state(run.model, run.mask.filter),
    )
    # ... and a new run can start from it (zero steps: its checkpoint is the adapter).
    start = run_cli(
        *args,
        "--config.max_steps=0",
        f"--config.peft.init_adapter={work / 'adapter'}",
        f"--workdir={tmp_path / 'c'}",
    )
    assert start.returncode == 0, start.stderr[-3000:]
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.state(restore.load_run(tmp_path / "c").model, run.mask.filter),
        nnx.state(run.model, run.mask.filter),
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.no_such_key=1"], "no_such_key"),
        (["--config.peft.method=lorra"], "error: unknown peft.method 'lorra'"),
        (
            ["--config.model.checkpoint=/nonexistent/model.gguf"],
            "/nonexistent/model.gguf does not exist",
        ),
        (
            ["--config.peft.method=lora", "--config.peft.lora.target_modules=.*/qq_proj"],
            "error: target regex '.*/qq_proj' matches no Linear module",
        ),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, extra, message):
    out = run_cli("--config=configs/tiny.py", f"--workdir={tmp_path}", *extra)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n{"text": oops}\n')
    out = run_cli(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.source=jsonl",
        f"--config.data.path={path}",
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{path}:2" in out.stderr


def test_cli_refuses_checkpoint_of_other_model(tmp_path):
    first = run_cli("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_cli(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}",
        "--config.max_steps=4",
        "--config.model.hidden_size=32",
    )
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "holds a checkpoint of a different model" in other.stderr
    # Nothing of the first run is lost or overwritten.
    assert any(r["split"] == "test" for r in read_metrics(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 64
