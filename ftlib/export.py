"""Export a run's fine-tuned model for Hugging Face tools.

  python -m ftlib.export --workdir=DIR --format=hf --out=OUT     # merged model, transformers
  python -m ftlib.export --workdir=DIR --format=peft --out=OUT   # LoRA adapter, peft

The model is rebuilt from DIR/config.json with the run's best params (else its latest).
`hf` merges every mergeable adapter (LoRA, DoRA, IA3) into the base kernels and writes a
plain checkpoint; `peft` writes LoRA factors in PEFT's adapter format for the HF base the run
started from (`config.model.checkpoint`, an HF folder).
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
    from ftlib.hf.peft_format import save_peft_adapter
    from ftlib.models.llama import Llama
    from ftlib.restore import load_run, read_config

    # Everything the config alone decides is checked before the (slow) rebuild.
    config = read_config(workdir)
    method, checkpoint = config.peft.method, config.model.checkpoint
    if config.data.format == "sequence_classification":
        raise FtlibError("export of sequence-classification (encoder) runs is not supported yet")
    if pathlib.Path(out).exists() and any(pathlib.Path(out).iterdir()):
        raise FtlibError(f"export folder {out} is not empty; give a new --out")
    if fmt == "peft" and method != "lora":
        raise FtlibError(
            f"--format=peft exports peft.method=lora only, this run used {method!r}; "
            "PEFT-format export of prompt, prefix and IA3 adapters is not implemented yet "
            "(--format=hf writes a merged model for lora, dora and ia3)"
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
        other = [p for p, t in run.mask.trainable.items() if t and "/lora_" not in p]
        if other:
            raise FtlibError(
                f"--format=peft holds LoRA factors only; this run also trained {other[:3]} "
                "(peft.trainable); use --format=hf"
            )
        base = str(pathlib.Path(checkpoint).absolute())
        return save_peft_adapter(run.model, run.config.peft.lora, out, base)
    peft.merge(run.model)  # prefix, prompt and bottleneck adapters stay: save_hf_folder refuses
    source = load_pretrained(checkpoint, weights=False).hf_config if checkpoint else {}
    return save_hf_folder(run.model, run.tokenizer, source, out)


def _define_flags():
    # Defined only when run as a program: tests import this module next to ftlib.evaluate
    # and ftlib.generate, which define --workdir too.
    flags.DEFINE_string("workdir", None, "Run directory of train.py.", required=True)
    flags.DEFINE_enum("format", "hf", FORMATS, "hf: merged model; peft: LoRA adapter.")
    flags.DEFINE_string("out", None, "New folder to write.", required=True)


def main():
    f = flags.FLAGS
    print(f"wrote {export(f.workdir, f.format, f.out)}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
