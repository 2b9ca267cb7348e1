"""A finished (or interrupted) run's model, rebuilt from DIR/config.json and DIR/checkpoints
(DIR local or a URL, see ftlib.metrics.run_dir).

Checkpoints hold trainable params only, so the rest is rebuilt the way the trainer built it:
the base model from config.model (pretrained file or seeded init), then the PEFT surgery
with config.seed; the best params are restored into it, else the latest.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftlib import masks, peft
from ftlib.checkpoint import Checkpointer
from ftlib.errors import FtlibError
from ftlib.metrics import run_dir
from ftlib.models import build_model
from ftlib.optim import make_optimizer
from ftlib.steps import TrainState


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict  # the run's resolved config (DIR/config.json)
    model: nnx.Module  # after surgery, with the restored trainable params
    tokenizer: object
    mask: masks.Mask
    step: int  # training step of the restored params
    restored: str  # 'best' or 'latest'


def read_config(workdir) -> ml_collections.ConfigDict:
    path = run_dir(workdir) / "config.json"
    if not path.exists():
        raise FtlibError(f"{workdir} has no config.json; give the --workdir of a train.py run")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_run(workdir) -> Run:
    config = read_config(workdir)
    if not (run_dir(workdir) / "checkpoints").is_dir():
        raise FtlibError(f"{workdir} has no checkpoints/; did the run save any?")
    # As the trainer does: an encoder's class head has one output per label word.
    classes = config.data.format == "sequence_classification"
    model, tokenizer = build_model(
        config.model, config.seed, len(config.data.label_words) if classes else 0
    )
    mask = peft.apply_method(model, config.peft, config.seed)
    _, params, _ = nnx.split(model, mask.filter, ...)
    ckpt = Checkpointer(workdir, config.checkpoint)
    try:
        best = ckpt.restore_best(params)
        if best is not None:
            params, meta = best
            step, restored = meta["step"], "best"
        else:
            tx = make_optimizer(config.optim, config.max_steps)
            latest = ckpt.restore_latest(
                TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
            )
            if latest is None:
                raise FtlibError(
                    f"{workdir}/checkpoints holds neither a best nor a latest checkpoint"
                )
            params, step, restored = latest[0].params, int(latest[0].step), "latest"
    finally:
        ckpt.close()
    nnx.update(model, params)
    return Run(config, model, tokenizer, mask, step, restored)
