"""The optax chain: warmup + cosine AdamW, global-norm clipping, decay mask.

Built over the trainable state only, so frozen params have no optimizer state.
`apply_gradients` is the step's update: the chain's, or the same arithmetic as one
fused pass per parameter where ftlib's CPU kernels run (ftlib.fused_adamw).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ftlib import fused_adamw
from ftlib.errors import FtlibError
from ftlib.masks import tree_path_str


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def decay_mask(no_decay_regex: str):
    """Weight decay everywhere except params matching `no_decay_regex` (norms, biases)."""
    regex = re.compile(no_decay_regex)

    def mask_fn(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not regex.fullmatch(tree_path_str(path)), params
        )

    return mask_fn


class AdamW(NamedTuple):
    """optax.chain(clip_by_global_norm or identity, adamw) for config.optim: `init` and
    `update` are the chain's, so it goes wherever an optax.GradientTransformation does;
    `cfg` (frozen) and `schedule` let apply_gradients run the chain's update fused.
    Built by make_optimizer only: _fused_adamw_step mirrors that chain, so a change to
    one is a change to both."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateFn
    cfg: ml_collections.FrozenConfigDict  # config.optim
    schedule: optax.Schedule


def make_optimizer(cfg, total_steps: int):
    """`cfg` is config.optim -> AdamW, wrapped in optax.MultiSteps when it accumulates."""
    if cfg.grad_clip_norm < 0:
        raise FtlibError(f"optim.grad_clip_norm={cfg.grad_clip_norm}: a norm >= 0 (0 = off)")
    schedule = learning_rate_schedule(cfg, total_steps)
    chain = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(cfg.no_decay),
        ),
    )
    tx = AdamW(chain.init, chain.update, ml_collections.FrozenConfigDict(cfg), schedule)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


def apply_gradients(tx, grads, opt_state, params):
    """One optimizer step -> (params, opt_state, global norm of `grads`).

    An AdamW whose leaves ftlib's CPU kernel takes runs fused_adamw leaf by leaf on the
    chain's own state (same pytrees, same arithmetic); anything else runs `tx.update` and
    optax.apply_updates."""
    if isinstance(tx, AdamW):
        adam = opt_state[1][0]  # make_optimizer's chain: (clip, (adam, decay, lr))
        if fused_adamw.applies(params, grads, adam.mu, adam.nu):
            return _fused_adamw_step(tx, grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)


def _fused_adamw_step(tx: AdamW, grads, opt_state, params):
    cfg = tx.cfg
    clip_state, (adam, decay_state, lr_state) = opt_state
    # With clipping the norm comes first, from one read of each gradient; without, the
    # update's own sums of squares give it.
    if cfg.grad_clip_norm:
        norm = jnp.sqrt(sum(fused_adamw.sum_squares(g) for g in jax.tree.leaves(grads) if g.size))
    else:
        norm = jnp.zeros((), jnp.float32)
    count = optax.safe_increment(adam.count)
    # Scalars as XLA:CPU computes them for optax's chain: its divisions by a scalar are
    # products with the scalar's reciprocal.
    scalars = jnp.stack(
        [
            -tx.schedule(lr_state.count),
            1 / (1 - cfg.b1**count),  # optax's bias corrections
            1 / (1 - cfg.b2**count),
            norm,
            1 / norm,
            cfg.grad_clip_norm,
        ]
    ).astype(jnp.float32)
    treedef = jax.tree.structure(params)
    decays = treedef.flatten_up_to(decay_mask(cfg.no_decay)(params))
    leaves = zip(*(treedef.flatten_up_to(t) for t in (params, grads, adam.mu, adam.nu)), decays)
    new_p, new_m, new_v, sums = [], [], [], []
    for p, g, m, v, decay in leaves:
        if p.size:  # a zero-size leaf has nothing to update (and no buffer to alias)
            wd = cfg.weight_decay if decay else 0.0
            p, m, v, sum_sq = fused_adamw.update(
                p, g, m, v, scalars, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd
            )
            sums.append(sum_sq)
        new_p.append(p)
        new_m.append(m)
        new_v.append(v)
    grad_norm = norm if cfg.grad_clip_norm else jnp.sqrt(sum(sums))
    adam = adam._replace(count=count, mu=treedef.unflatten(new_m), nu=treedef.unflatten(new_v))
    lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
    opt_state = (clip_state, (adam, decay_state, lr_state))
    return treedef.unflatten(new_p), opt_state, grad_norm
