"""Runs that change shape under the same workdir, each compared with one
uninterrupted one-process, one-device run of the same config (train.py, tiny):

- the multi-host code path for real: two processes on localhost joined by
  jax.distributed (gloo CPU collectives), 2 CPU devices each; each process hands
  over only its own rows of every batch; the run checkpoints and is restarted
  (both processes restore);
- restore onto another mesh: saved on (8,1,1), resumed on (2,2,2), then on 1 device.
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

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


def _launch(workdir, steps, devices, process_id=None, port=None, mesh=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    cmd = [sys.executable, "train.py", *OVERRIDES, f"--workdir={workdir}"]
    cmd.append(f"--config.max_steps={steps}")
    if mesh:
        cmd += [f"--config.mesh.{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), mesh)]
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run; started first, it overlaps the runs under test."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _launch(workdir, 8, 1)

    @functools.cache
    def finished():
        _wait([proc])
        return workdir

    yield finished
    proc.kill()


def _assert_same_run(workdir, reference_dir):
    train, ref_train = _losses(workdir, "train"), _losses(reference_dir, "train")
    assert sorted(train) == list(range(1, 9)) == sorted(ref_train)
    np.testing.assert_allclose(
        [train[s] for s in range(1, 9)], [ref_train[s] for s in range(1, 9)], atol=2e-5
    )
    test, ref_test = _losses(workdir, "test"), _losses(reference_dir, "test")
    np.testing.assert_allclose(list(test.values()), list(ref_test.values()), atol=2e-5)
    assert (workdir / "summary.json").exists()


def test_two_processes_equal_one_process_and_resume(tmp_path, reference):
    first = _two_processes(tmp_path, 4)
    assert "mesh: {'data': 4, 'fsdp': 1, 'tensor': 1}" in first
    assert "resumed from step 4" in _two_processes(tmp_path, 8)
    _assert_same_run(tmp_path, reference())


@pytest.mark.slow  # three runs in a row: ~2 min on an idle 2-core machine
def test_resume_on_another_mesh(tmp_path, reference):
    _wait([_launch(tmp_path, 4, 8, mesh=(8, 1, 1))])
    out = _wait([_launch(tmp_path, 6, 8, mesh=(2, 2, 2))])
    assert "resumed from step 4" in out and "'tensor': 2" in out
    assert "resumed from step 6" in _wait([_launch(tmp_path, 8, 1)])
    _assert_same_run(tmp_path, reference())
