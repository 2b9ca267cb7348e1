"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Llama-family projections have no biases, so plain BitFit has nothing to train
there; `include_norms=True` selects the documented norm-scale variant, which
also trains the norm layers' scales (`norm_params`), the closest analogue of
a bias in a bias-free model (a per-feature affine parameter).
"""

from __future__ import annotations

import re

from flax import nnx

from ftlib import masks
from ftlib.errors import FtlibError

BIAS = r".*/bias$"


def apply(model: nnx.Module, cfg, rngs: nnx.Rngs) -> None:
    del rngs  # no surgery, only a check
    paths = [masks.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    if not cfg.bitfit.include_norms and not any(re.fullmatch(BIAS, p) for p in paths):
        raise FtlibError(
            "peft.method 'bitfit' trains biases, and this model has no bias params "
            "(Llama projections are bias-free); set peft.bitfit.include_norms=True for the "
            "norm-scale variant (biases + norm scales) or choose another method"
        )


def TRAINABLE_RULES(cfg):  # noqa: N802 (the registry's name; a function since it reads cfg)
    """Biases, plus the norm scales when `include_norms`."""
    norms = [(cfg.bitfit.norm_params, True)] if cfg.bitfit.include_norms else []
    return ((BIAS, True), *norms, (r".*", False))


OPTIONS = ("include_norms", "norm_params")
