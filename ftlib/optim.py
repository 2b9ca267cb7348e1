"""The optax chain: warmup + cosine AdamW, global-norm clipping, decay mask.

Built over the trainable state only, so frozen params have no optimizer state.
`apply_gradients` is the step's update: the chain's, or the same arithmetic as one
fused pass per parameter where ftlib's CPU kernels run (ftlib.fused_adamw).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftlib import fused_adamw
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
    `cfg` and `schedule` let apply_gradients run the chain's update fused."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateFn
    cfg: Any  # config.optim
    schedule: optax.Schedule


def make_optimizer(cfg, total_steps: int):
    """`cfg` is config.optim -> AdamW, wrapped in optax.MultiSteps when it accumulates."""
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
    tx = AdamW(chain.init, chain.update, cfg, schedule)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


def apply_gradients(tx, grads, opt_state, params):
    """One optimizer step -> (params, opt_state, global norm of `grads`).

    An AdamW whose leaves ftlib's CPU kernel takes runs fused_adamw leaf by leaf on the
    chain's own state (same pytrees, same arithmetic); anything else runs `tx.update`
    and optax.apply_updates."""
    if isinstance(tx, AdamW):
        adam = opt_state[1][0]  # make_optimizer's chain: (clip, (adam, decay, lr))
        if fused_adamw.applies(params, grads, adam.mu, adam.nu):
            return _fused_adamw_step(tx, grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)


def _fused_adamw_step(tx: AdamW, grads, opt_state, params):
    cfg = tx.cfg
    clip_state, (adam, decay_state, lr_state) = opt_state
    clip = cfg.grad_clip_norm
    norm = optax.tree.norm(grads) if clip else jnp.zeros((), jnp.float32)
    count = optax.safe_increment(adam.count)
    scalars = jnp.stack(
        [
            -tx.schedule(lr_state.count),
            1 - cfg.b1**count,  # optax's bias corrections, as it computes them
            1 - cfg.b2**count,
            norm,
            jnp.float32(clip),
        ]
    ).astype(jnp.float32)
    treedef = jax.tree.structure(params)
    decays = treedef.flatten_up_to(decay_mask(cfg.no_decay)(params))
    p, m, v, sum_sq = zip(
        *(
            fused_adamw.update(
                *leaf,
                scalars,
                b1=cfg.b1,
                b2=cfg.b2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay if decay else 0.0,
            )
            for *leaf, decay in zip(
                *(treedef.flatten_up_to(t) for t in (params, grads, adam.mu, adam.nu)), decays
            )
        )
    )
    grad_norm = norm if clip else jnp.sqrt(sum(sum_sq))
    adam = adam._replace(count=count, mu=treedef.unflatten(m), nu=treedef.unflatten(v))
    lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
    opt_state = (clip_state, (adam, decay_state, lr_state))
    return treedef.unflatten(p), opt_state, grad_norm
