"""Mesh construction and the logical-axis rules table (single device here; the
multi-device checks belong to the scale tests)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny_llama import CFG

from configs import default
from ftlib import sharding
from ftlib.errors import FtlibError
from ftlib.models.llama import Llama

RULES = tuple(default.get_config().sharding_rules)


def test_mesh_from_config():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(FtlibError, match="needs 4 devices"):
        sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    with pytest.raises(FtlibError, match="at most one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})


def test_logical_spec_follows_rules():
    assert sharding.logical_spec(("layers", "embed", "mlp"), RULES) == P(None, "fsdp", "tensor")
    # A mesh axis is used once per array: the second 'tensor' dim is replicated.
    assert sharding.logical_spec(("heads", "kv"), RULES) == P("tensor", None)
    with pytest.raises(FtlibError, match="param w: logical axis 'experts' has no entry"):
        sharding.logical_spec(("experts",), RULES, name="w")


def test_every_param_gets_a_sharding():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = sharding.tree_shardings(nnx.state(model, nnx.Param), mesh, RULES)
    text = sharding.summary(shardings)
    assert "blocks/mlp/gate_proj/kernel: P(None, 'fsdp', 'tensor')" in text
    assert "embed/embedding: P('tensor', 'fsdp')" in text
    assert len(text.splitlines()) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_indivisible_dim_names_param_and_axis():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 3, "tensor": 1}

    with pytest.raises(FtlibError, match=r"param q: dim 0 \(embed\) of size 32 is not divisible"):
        sharding.logical_spec(("embed", "heads"), RULES, (32, 32), FakeMesh(), "q")
