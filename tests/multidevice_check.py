"""Multi-device half of tests/test_multidevice.py, run in a subprocess.

Fakes 8 CPU devices (the flag must be set before jax is imported), trains a tiny
random Llama for 3 steps per (method, mesh) the way the trainer does (split by
mask, device_put with shardings, jit with in/out shardings and donation), and
compares with the same run on a one-device mesh. Prints one JSON object; the
trained params go to OUT_DIR/params.npz for the test to compare.

  PYTHONPATH=. python tests/multidevice_check.py OUT_DIR
"""

import dataclasses
import os

# Fewer XLA:CPU optimisation passes compile ~2x faster, same fp32 results within 1e-6.
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
if __name__ == "__main__":  # imported by the test for its constants: leave its jax alone
    os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny_llama  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from ftlib import masks, optim, peft, sharding, steps  # noqa: E402
from ftlib.data import pipeline  # noqa: E402
from ftlib.errors import FtlibError  # noqa: E402
from ftlib.models.llama import Llama  # noqa: E402

# Every sharded dim (vocab 64, embed 32, mlp 64, heads 4x8, kv 2x8) divides 4.
CFG = dataclasses.replace(tiny_llama.CFG, intermediate_size=64)
RULES = tuple(default.get_config().sharding_rules)
METHODS = ("full", "lora", "prefix")
MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4))  # (data, fsdp, tensor)
N_STEPS, BATCH, SEQ = 3, 8, 16
EVAL_CHOICES = np.array([5, 9], np.int32)  # label words' token ids for the eval check


def peft_cfg(method):
    c = default.get_config().peft
    c.method = method
    c.lora.update(dict(rank=4, alpha=8.0))
    c.prefix.num_virtual_tokens = 4
    return c


def optim_cfg():
    c = default.get_config().optim
    # No warmup (its first lr is 0): every step moves every param. A larger lr makes
    # Adam amplify fp32 reduction-order noise in near-zero grads past 1e-5.
    c.learning_rate, c.warmup_steps = 1e-3, 0
    return c


def make_batch(seed, rows=BATCH):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (rows, SEQ)).astype(np.int32)
    return dict(
        input_ids=ids,
        loss_mask=np.ones_like(ids),
        segment_ids=np.ones_like(ids),
        positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy(),
    )


def spec_of(spec, ndim):
    """PartitionSpec as a JSON list padded with None to the array's rank."""
    parts = [list(p) if isinstance(p, tuple) else p for p in spec]
    return parts + [None] * (ndim - len(parts))


def spec_report(tree, mesh):
    """name -> [actual spec, spec the rules give] for every Variable leaf of `tree`
    (an nnx.State or an optimizer state holding Variables)."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for path, var in leaves:
        if not isinstance(var, nnx.Variable):
            continue  # step counters
        name = optim.tree_path_str(path)
        value = var[...]
        expected = sharding.logical_spec(
            var.get_metadata()["logical_axes"], RULES, value.shape, mesh, name
        )
        out[name] = [spec_of(value.sharding.spec, value.ndim), spec_of(expected, value.ndim)]
    return out


def run(method, mesh_shape):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg(method), seed=0)
    tx = optim.make_optimizer(optim_cfg(), 10)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    state_sh = sharding.tree_shardings(state, mesh, RULES)
    frozen_sh = sharding.tree_shardings(frozen, mesh, RULES)
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    step = jax.jit(
        steps.make_train_step(graphdef, tx),
        donate_argnums=0,
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
    losses = []
    for i in range(N_STEPS):
        batch = sharding.put_batch(make_batch(i), mesh)
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    params_np = {masks.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}
    specs = {
        "params": spec_report(state.params, mesh),
        "frozen": spec_report(frozen, mesh),
        "opt_state": spec_report(state.opt_state, mesh),
    }
    return losses, params_np, specs


def batch_report(mesh_shape):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    ids = sharding.put_batch(make_batch(0), mesh)["input_ids"]
    rows = sorted({s.index[0].start or 0 for s in ids.addressable_shards})
    report = {
        "spec": spec_of(ids.sharding.spec, ids.ndim),
        "shard_shapes": sorted({tuple(s.data.shape) for s in ids.addressable_shards}),
        "row_starts": rows,
    }
    try:
        sharding.put_batch(make_batch(0, rows=7), mesh)  # 7 rows divide no data x fsdp > 1
        report["error"] = None
    except FtlibError as e:
        report["error"] = str(e)
    return report


def eval_report(mesh_shape):
    """Label-word eval sums over packed batches (data.pipeline.eval_batches) on this
    mesh, and whether the compiled eval step gathers anything across devices."""
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, peft_cfg("lora"), seed=0)
    graphdef, params, frozen = nnx.split(model, mask.filter, ...)
    params_sh = sharding.tree_shardings(params, mesh, RULES)
    frozen_sh = sharding.tree_shardings(frozen, mesh, RULES)
    params, frozen = jax.device_put(params, params_sh), jax.device_put(frozen, frozen_sh)
    step = jax.jit(
        steps.make_eval_step(graphdef, EVAL_CHOICES),
        in_shardings=(params_sh, frozen_sh, sharding.batch_sharding(mesh)),
    )
    examples = tiny_llama.label_word_examples(40, EVAL_CHOICES, longest_prompt=11)
    batches = [
        sharding.put_batch(b, mesh)
        for b in pipeline.eval_batches(
            examples, BATCH, pad_id=0, seq_len=SEQ, pad_to_multiple=0, row_len=SEQ, slots_per_row=5
        )
    ]
    sums = [step(params, frozen, b) for b in batches]
    hlo = step.lower(params, frozen, batches[0]).compile().as_text()
    return {
        "sums": {k: float(sum(s[k] for s in sums)) for k in sums[0]},
        "all_gather": "all-gather" in hlo,
    }


def main(out_dir):
    assert jax.device_count() == 8, jax.devices()
    results = {"runs": {}, "batch": {}, "eval": {}}
    arrays = {}
    for method in METHODS:
        for mesh_shape in MESHES:
            key = f"{method}/{','.join(map(str, mesh_shape))}"
            losses, params_np, specs = run(method, mesh_shape)
            results["runs"][key] = {"losses": losses, "specs": specs}
            arrays.update({f"{key}|{name}": v for name, v in params_np.items()})
    for mesh_shape in MESHES[1:]:
        results["batch"][",".join(map(str, mesh_shape))] = batch_report(mesh_shape)
    for mesh_shape in MESHES:
        results["eval"][",".join(map(str, mesh_shape))] = eval_report(mesh_shape)
    np.savez(os.path.join(out_dir, "params.npz"), **arrays)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
