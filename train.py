"""Fine-tune a model from an ml_collections config.

  python train.py --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]

Without --config it runs configs/default.py (SmolLM2-135M-Instruct + LoRA on
Rotten Tomatoes). Rerunning on the same --workdir resumes from its checkpoint.
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from ftlib import cli

_DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics, summary.")


def main():
    from ftlib import peft, trainer  # after flag parsing: jax reads XLA_FLAGS at import

    # A --config.peft.<method>.* override for a method not in peft.method does nothing: refuse.
    peft.check_config(_CONFIG.value.peft, config_flags.get_override_values(flags.FLAGS["config"]))
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(trainer.summary_table(summary))


if __name__ == "__main__":
    cli.run(main)
