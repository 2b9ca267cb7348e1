"""Export a run's fine-tuned model for Hugging Face tools.

  python -m ftlib.export --workdir=DIR --format=hf --out=OUT     # merged model, transformers
  python -m ftlib.export --workdir=DIR --format=peft --out=OUT   # adapter folder, peft

The model is rebuilt from DIR/config.json with the run's best params (else its latest).
`hf` merges every mergeable adapter (LoRA, DoRA, IA3) into the base kernels and writes a
plain checkpoint; `peft` writes a LoRA, prompt-tuning, prefix-tuning or IA3 adapter in PEFT's
adapter format for the HF base the run started from (`config.model.checkpoint`, an HF folder),
for `peft.PeftModel.from_pretrained(base, OUT)`. Prefix and prompt runs export as `peft` only.
"""

from __future__ import annotations

import pathlib

from absl import flags

from ftlib import cli

FORMATS = ("hf", "peft")


def export(workdir: str, fmt: str, out: str) -> pathlib.Path:
    # Imported here, not at the top: jax reads XLA_FLAGS at import, after flag parsing.
    from ftlib import peft
    from ftlib.errors import FtlibError
    from ftlib.hf import load_pretrained
    from ftlib.hf.hf_export import save_hf_folder
    from ftlib.hf.peft_format import PEFT_METHODS, save_peft
    from ftlib.models.llama import Llama
    from ftlib.restore import load_run, read_config

    # Everything the config alone decides is checked before the (slow) rebuild.
    config = read_config(workdir)
    method, checkpoint = config.peft.method, config.model.checkpoint
    if config.data.format == "sequence_classification":
        raise FtlibError("export of sequence-classification (encoder) runs is not supported yet")
    if pathlib.Path(out).exists() and any(pathlib.Path(out).iterdir()):
        raise FtlibError(f"export folder {out} is not empty; give a new --out")
    names = set(method.split("+"))
    if fmt == "peft" and len(names) > 1:
        raise FtlibError(
            f"--format=peft writes one adapter per folder; this run used {method!r}, composed "
            "of several methods (export of composite methods is not supported)"
        )
    if fmt == "peft" and method not in PEFT_METHODS:
        raise FtlibError(
            f"--format=peft exports a single peft.method of {', '.join(PEFT_METHODS)}; this run "
            f"used {method!r} (--format=hf writes a merged model for lora, dora and ia3)"
        )
    if fmt == "hf" and names & {"prefix", "prompt"}:
        raise FtlibError(
            f"--format=hf writes a plain model, and {method!r}'s virtual tokens do not merge "
            "into its weights; use --format=peft for prefix and prompt tuning"
        )
    if fmt == "hf" and "adapter" in names:
        raise FtlibError(
            f"--format=hf writes a plain model, and {method!r}'s bottleneck adapters do not "
            "merge into its weights; they have no HF or PEFT export"
        )
    if fmt == "peft" and not (checkpoint and pathlib.Path(checkpoint).is_dir()):
        raise FtlibError(
            f"--format=peft needs a run on an HF base folder (config.model.checkpoint), "
            f"not {checkpoint or 'a random init'!r}: PEFT loads adapters onto a transformers model"
        )
    run = load_run(workdir)
    if not isinstance(run.model, Llama):
        raise FtlibError(f"export of {type(run.model).__name__} models is not supported yet")
    if fmt == "peft":
        own = {"lora": "/lora_", "prompt": "prompt/", "prefix": "prefix/", "ia3": "/ia3_scale"}
        other = [p for p, t in run.mask.trainable.items() if t and own[method] not in p]
        if other:
            raise FtlibError(
                f"--format=peft holds the {method} adapter only; this run also trained "
                f"{other[:3]} (peft.trainable); use --format=hf"
            )
        base = str(pathlib.Path(checkpoint).absolute())
        return save_peft(run.model, run.config.peft, out, base)
    peft.merge(run.model)  # prefix, prompt and bottleneck adapters stay: save_hf_folder refuses
    source = load_pretrained(checkpoint, weights=False).hf_config if checkpoint else {}
    return save_hf_folder(run.model, run.tokenizer, source, out)


def _define_flags():
    # Defined only when run as a program: tests import this module next to ftlib.evaluate
    # and ftlib.generate, which define --workdir too.
    flags.DEFINE_string("workdir", None, "Run directory of train.py.", required=True)
    flags.DEFINE_enum("format", "hf", FORMATS, "hf: merged model; peft: adapter folder.")
    flags.DEFINE_string("out", None, "New folder to write.", required=True)


def main():
    f = flags.FLAGS
    print(f"wrote {export(f.workdir, f.format, f.out)}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
