"""Orbax checkpoints in DIR/checkpoints/: `latest/` (last N, for resume: train
state + data iterator position + loop meta) and `best/` (params of the best
val metric). Only trainable params are saved: frozen params are rebuilt from
config.model (pretrained file or seeded init), so LoRA checkpoints are
adapter-sized.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from ftlib.errors import FtlibError
from ftlib.masks import tree_path_str
from ftlib.metrics import run_dir


def param_shapes(params) -> dict[str, list[int]]:
    return {
        tree_path_str(p): list(np.shape(x))
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


class Checkpointer:
    def __init__(self, workdir: str, cfg):
        root = run_dir(workdir) / "checkpoints"
        self.latest = ocp.CheckpointManager(
            root / "latest",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True
            ),
        )
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, enable_async_checkpointing=cfg.async_save, create=True
            ),
        )

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False):
        if self.latest.latest_step() == step:
            return  # already saved at this step (e.g. periodic save on the last step)
        meta = {**meta, "param_shapes": param_shapes(state.params)}
        self.latest.save(
            step,
            force=force,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore_latest(self, abstract_state):
        """(state, data_state, meta) of the latest checkpoint, or None if there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        _check_compatible(
            meta["param_shapes"], param_shapes(abstract_state.params), self.latest.directory
        )
        out = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"], meta

    def save_best(self, step: int, params, meta: dict):
        self.best.save(
            step,
            force=True,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore_best(self, abstract_params):
        """(params, meta) of the best checkpoint, or None if none was saved."""
        step = self.best.latest_step()
        if step is None:
            return None
        out = self.best.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()
            ),
        )
        return out["params"], out["meta"]

    def best_bytes(self) -> int:
        """On-disk size of the best checkpoint (0 if none was saved)."""
        step = self.best.latest_step()
        if step is None:
            return 0
        return _tree_bytes(run_dir(self.best.directory) / str(step))

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()


def _tree_bytes(root) -> int:
    # epath walks local and gs:// trees alike (rglob is local-only there).
    return sum(_tree_bytes(p) if p.is_dir() else p.stat().length for p in root.iterdir())


def _check_compatible(saved: dict, current: dict, directory) -> None:
    if saved == current:
        return
    diff = sorted(set(saved) ^ set(current)) or sorted(
        k for k in saved if saved[k] != current.get(k)
    )
    first = diff[0]
    raise FtlibError(
        f"{directory} holds a checkpoint of a different model: param {first} is "
        f"{saved.get(first, 'absent')} there, {current.get(first, 'absent')} now "
        f"({len(diff)} params differ); use a new --workdir or the original config"
    )
