"""The optax chain: warmup + cosine AdamW, global-norm clipping, decay mask.

Built over the trainable state only, so frozen params have no optimizer state.
"""

from __future__ import annotations

import re

import jax
import optax

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


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """`cfg` is config.optim."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(cfg.no_decay),
        ),
    )
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx
