"""Sharded training equals one-device training: for `full`, `lora` and `prefix` on four
8-device meshes, the 3 step losses and the trained params match the one-device
run; every param, frozen param and optimizer moment keeps the sharding the rules
give; batches split over data x fsdp; packed label-word eval sums match too. Gradient
accumulation equals one step on the concatenated batch.

The 8 fake CPU devices live in one subprocess (tests/multidevice_check.py): the
device count is fixed when jax starts, and this process has started it already.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ftlib import masks, optim, peft, steps
from ftlib.models.llama import Llama

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import multidevice_check as check  # noqa: E402  (no jax work at import)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = [",".join(map(str, m)) for m in check.MESHES[1:]]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def check_run(tmp_path_factory):
    """Starts the 8-device subprocess; it runs on the other core while the
    in-process tests (which request this fixture first) compute."""
    out = tmp_path_factory.mktemp("multidevice")
    env = dict(
        os.environ,
        XLA_FLAGS=check.XLA_FLAGS,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        JAX_PLATFORMS="cpu",
    )
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multidevice_check.py"), str(out)],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    yield proc, out
    if proc.poll() is None:  # only part of the file ran
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def results(check_run):
    proc, out = check_run
    assert proc.wait(timeout=300) == 0, (out / "stderr").read_text()[-4000:]
    report = json.loads((out / "stdout").read_text().strip().splitlines()[-1])
    with np.load(out / "params.npz") as npz:
        report["params"] = {k: npz[k] for k in npz.files}
    return report


@functools.cache
def _initial_params(method):
    model = Llama(check.CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, check.peft_cfg(method), seed=0)
    return {
        masks.path_str(p): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.split(model, mask.filter, ...)[1])
    }


def _train(method, grad_accum, batches):
    model = Llama(check.CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, check.peft_cfg(method), seed=0)
    cfg = check.optim_cfg()
    cfg.grad_accum_steps = grad_accum
    tx = optim.make_optimizer(cfg, 10)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=0)
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, {
        masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)
    }


@pytest.mark.parametrize("method", check.METHODS)
def test_grad_accumulation_matches_big_batch(check_run, method):
    """k micro-batches of B/k rows = one step on the B rows: the loss is a mean over
    target tokens and every row has the same count (all-ones loss_mask), so the
    mean of the k micro-batch means is the big batch's mean."""
    k, updates = 4, 2
    big = [check.make_batch(i) for i in range(updates)]
    micro = [
        {name: v[j * check.BATCH // k : (j + 1) * check.BATCH // k] for name, v in b.items()}
        for b in big
        for j in range(k)
    ]
    big_losses, big_params = _train(method, 1, big)
    micro_losses, micro_params = _train(method, k, micro)
    np.testing.assert_allclose(
        np.mean(np.reshape(micro_losses, (updates, k)), 1), big_losses, **TOL
    )
    initial = _initial_params(method)
    for name, value in micro_params.items():
        np.testing.assert_allclose(value, big_params[name], err_msg=name, **TOL)
        assert np.abs(value - initial[name]).max() > 1e-4, f"{name} did not move"


def _params(results, key):
    prefix = f"{key}|"
    return {k.removeprefix(prefix): v for k, v in results["params"].items() if k.startswith(prefix)}


@pytest.mark.parametrize("method", check.METHODS)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_match_one_device(results, method, mesh):
    ref_key, key = f"{method}/1,1,1", f"{method}/{mesh}"
    np.testing.assert_allclose(
        results["runs"][key]["losses"], results["runs"][ref_key]["losses"], **TOL
    )
    ref, got = _params(results, ref_key), _params(results, key)
    assert set(got) == set(ref) and ref
    for name, value in got.items():
        np.testing.assert_allclose(value, ref[name], err_msg=f"{key} {name}", **TOL)
    # The steps did train: every trainable param moved away from its init.
    initial = _initial_params(method)
    for name, value in ref.items():
        assert np.abs(value - initial[name]).max() > 1e-4, f"{method} {name} did not move"


@pytest.mark.parametrize("method", check.METHODS)
@pytest.mark.parametrize("mesh", MESHES)
def test_shardings_follow_rules(results, method, mesh):
    specs = results["runs"][f"{method}/{mesh}"]["specs"]
    assert specs["params"] and specs["opt_state"]
    assert bool(specs["frozen"]) == (method != "full")
    sharded = 0
    for group, table in specs.items():
        for name, (actual, expected) in table.items():
            assert actual == expected, f"{group} {name} on mesh {mesh}: {actual} != {expected}"
            sharded += any(actual)
    assert sharded, f"nothing is sharded on mesh {mesh}"


@pytest.mark.parametrize("mesh", MESHES)
def test_batch_is_split(results, mesh):
    data, fsdp, _ = map(int, mesh.split(","))
    report = results["batch"][mesh]
    assert report["spec"] == [["data", "fsdp"], None]
    assert report["shard_shapes"] == [[check.BATCH // (data * fsdp), check.SEQ]]
    assert report["row_starts"] == list(range(0, check.BATCH, check.BATCH // (data * fsdp)))
    assert report["error"] == (
        f"batch of 7 rows is not divisible by the data axes of the mesh "
        f"({data * fsdp} = data x fsdp); change data.batch_size or config.mesh"
    )


@pytest.mark.parametrize("mesh", MESHES)
def test_packed_label_word_eval_matches_one_device(results, mesh):
    """Packed eval rows keep their example slots beside them: the sums match one device,
    and on a data-only mesh nothing is gathered across devices."""
    got, want = results["eval"][mesh], results["eval"]["1,1,1"]
    assert want["sums"]["tokens"] == 40
    for name, value in want["sums"].items():
        np.testing.assert_allclose(got["sums"][name], value, err_msg=name, **TOL)
    if mesh == "8,1,1":
        assert not got["all_gather"]
