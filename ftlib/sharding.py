"""Mesh and shardings: logical axis names -> mesh axes through ONE rules table.

Params carry `logical_axes` metadata ('embed', 'mlp', ...). `config.sharding_rules`
is an ordered table (logical axis, mesh axis or tuple of mesh axes or None). Every
logical axis a param uses must appear in the table (else an error naming the
param); a mesh axis is used at most once per array; a dim that the mesh axes do
not divide is an error naming the param and the axis.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftlib.errors import FtlibError
from ftlib.masks import tree_path_str

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch dimension.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """config.mesh {data, fsdp, tensor}: sizes, one of them may be -1 (= the rest)."""
    devices = devices if devices is not None else jax.devices()
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise FtlibError(
            f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise FtlibError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise FtlibError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
            f"devices, have {len(devices)}"
        )
    # Auto axes: XLA propagates shardings inside the step from the in/out shardings.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes, rules, shape=None, mesh=None, name="?") -> P:
    table = dict(rules)
    used, spec = set(), []
    for i, axis in enumerate(axes):
        if axis not in table:
            raise FtlibError(
                f"param {name}: logical axis {axis!r} has no entry in "
                f"config.sharding_rules ({', '.join(table)})"
            )
        target = table[axis]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None and shape is not None and mesh_axes:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[i] % size:
                raise FtlibError(
                    f"param {name}: dim {i} ({axis}) of size {shape[i]} is not divisible "
                    f"by mesh axes {mesh_axes} of size {size}; change config.mesh or "
                    f"config.sharding_rules"
                )
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules):
    """Same structure as `tree` (an nnx.State or optimizer state holding
    Variables): each Variable's value becomes its NamedSharding; plain leaves
    (step counters) are replicated."""

    def shard(path, x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("logical_axes")
            name = tree_path_str(path)
            if axes is None:
                raise FtlibError(f"param {name} has no logical_axes metadata")
            return x.replace(NamedSharding(mesh, logical_spec(axes, rules, x.shape, mesh, name)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(
        shard, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host global batch -> global arrays split over the batch axes."""
    data_size = math.prod(mesh.shape[a] for a in BATCH_AXES)
    rows = next(iter(batch.values())).shape[0]
    if rows % data_size:
        raise FtlibError(
            f"batch of {rows} rows is not divisible by the data axes of the mesh "
            f"({data_size} = data x fsdp); change data.batch_size or config.mesh"
        )
    sharding = batch_sharding(mesh)
    # Every process builds the same global batch (deterministic order and padding, so
    # all agree on its shape) and hands over only the rows its own devices hold: on a
    # pod each host transfers its shard, never the whole batch.
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def summary(tree_of_shardings) -> str:
    lines = []
    for path, s in jax.tree_util.tree_flatten_with_path(tree_of_shardings)[0]:
        lines.append(f"  {tree_path_str(path)}: {s.spec}")
    return "\n".join(lines)
