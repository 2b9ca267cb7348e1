"""The multi-host code path for real: two processes on localhost joined by
jax.distributed (gloo CPU collectives), 2 CPU devices each, run train.py on the
tiny config; each process hands over only its own rows of every batch. The run
checkpoints, is restarted (both processes restore), and its losses equal a
one-process, one-device run of the same config."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from ftlib.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Constant learning rate: a run stopped at step 4 and resumed to 8 then follows
# the same schedule as one run of 8 steps.
OVERRIDES = (
    "--config=configs/tiny.py:lora",
    "--config.optim.warmup_steps=0",
    "--config.optim.end_lr_ratio=1.0",
    "--config.log_every=1",
    "--config.eval.every=4",
    "--config.checkpoint.every=4",
    "--config.data.batch_size=8",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, steps, devices, process_id=None, port=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    cmd = [sys.executable, "train.py", *OVERRIDES, f"--workdir={workdir}"]
    cmd.append(f"--config.max_steps={steps}")
    if process_id is not None:
        cmd += [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(procs, timeout=600):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
    return out


def _two_processes(workdir, steps):
    port = _free_port()
    return _wait([_launch(workdir, steps, 2, i, port) for i in (0, 1)])


def _losses(workdir, split):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == split}


def test_two_processes_equal_one_process_and_resume(tmp_path):
    single = _launch(tmp_path / "single", 8, 1)  # overlaps with the first 2-process run
    first = _two_processes(tmp_path / "multi", 4)
    assert "mesh: {'data': 4, 'fsdp': 1, 'tensor': 1}" in first
    resumed = _two_processes(tmp_path / "multi", 8)
    assert "resumed from step 4" in resumed
    _wait([single])

    multi_train, single_train = (
        _losses(tmp_path / "multi", "train"),
        _losses(tmp_path / "single", "train"),
    )
    assert sorted(multi_train) == list(range(1, 9)) == sorted(single_train)
    np.testing.assert_allclose(
        [multi_train[s] for s in range(1, 9)], [single_train[s] for s in range(1, 9)], atol=2e-5
    )
    multi_test, single_test = (
        _losses(tmp_path / "multi", "test"),
        _losses(tmp_path / "single", "test"),
    )
    np.testing.assert_allclose(list(multi_test.values()), list(single_test.values()), atol=2e-5)
    assert (tmp_path / "multi" / "summary.json").exists()
