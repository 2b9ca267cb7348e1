"""Fine-tune a model from an ml_collections config.

  python train.py --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]

Without --config it runs configs/default.py (SmolLM2-135M-Instruct + LoRA on
Rotten Tomatoes). Rerunning on the same --workdir resumes from its checkpoint.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ftlib.errors import FtlibError

_DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics, summary.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from ftlib import trainer  # after flag parsing: jax reads XLA_FLAGS at import

    try:
        summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except FtlibError as e:
        sys.exit(f"error: {e}")
    print(trainer.summary_table(summary))


if __name__ == "__main__":
    app.run(main)
