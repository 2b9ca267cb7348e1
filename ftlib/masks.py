"""Trainable masks: which params optax updates.

A Mask maps every param path ('blocks/attn/q_proj/lora_a') to True/False, built
from ordered (regex, trainable) rules, first full match wins. A param that no
rule covers is an error naming it. The mask is an ordinary, printable mapping;
`mask.filter` turns it into an nnx filter so the trainer can split the model
into trainable and frozen states (gradients and optimizer state exist only for
the trainable one).
"""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from ftlib.errors import FtlibError


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def tree_path_str(path) -> str:
    """'blocks/attn/q_proj/kernel' for a jax key path into an nnx.State (the
    trailing '.value' of each Variable dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


@dataclasses.dataclass(frozen=True)
class Mask:
    trainable: dict[str, bool]  # param path -> trainable, in model order
    shapes: dict[str, tuple[int, ...]]  # param path -> shape

    def filter(self, path, _value=None) -> bool:
        """nnx filter: True for trainable params."""
        return self.trainable.get(path_str(path), False)

    def count(self, trainable: bool | None = None) -> int:
        return sum(
            _size(s)
            for p, s in self.shapes.items()
            if trainable is None or self.trainable[p] == trainable
        )

    def table(self) -> str:
        """Trainable paths with shapes and counts, then totals."""
        rows = [(p, self.shapes[p]) for p, t in self.trainable.items() if t]
        width = max([len(p) for p, _ in rows] + [10])
        lines = [f"{'trainable param':<{width}}  {'shape':<20} {'count':>12}"]
        lines += [f"{p:<{width}}  {str(s):<20} {_size(s):>12,}" for p, s in rows]
        n, total = self.count(True), self.count()
        lines.append(f"trainable {n:,} / total {total:,} params ({100 * n / max(total, 1):.3f}%)")
        return "\n".join(lines)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_mask(model: nnx.Module, rules) -> Mask:
    compiled = [(re.compile(r), t) for r, t in rules]
    trainable, shapes = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_str(path)
        for regex, t in compiled:
            if regex.fullmatch(name):
                trainable[name] = t
                break
        else:
            raise FtlibError(f"no trainable/freeze rule covers param {name}; add a catch-all rule")
        shapes[name] = tuple(var.shape)
    if not any(trainable.values()):
        raise FtlibError("the mask freezes every param: nothing would train; check peft.freeze")
    return Mask(trainable, shapes)
