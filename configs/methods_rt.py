"""Every PEFT method on the Rotten Tomatoes snippets, at equal steps: the first ablation.

Two bases, picked by the config argument:
  smollm2: SmolLM2-135M-Instruct, sentiment as the next word (configs/default.py)
  minilm:  all-MiniLM-L6-v2 + class head (configs/minilm_rt_lora.py)

  python -m ftlib.sweep --config=configs/methods_rt.py:smollm2 --workdir=runs/methods_smollm2
  python -m ftlib.sweep --config=configs/methods_rt.py:minilm --workdir=runs/methods_minilm

Each method runs at a learning rate of the kind its paper uses (see METHOD_LR).
Results: experiments/methods/README.md; plot: notebooks/methods.ipynb.
"""

from configs import default, minilm_rt_lora

# method -> peak learning rate (AdamW, warmup + cosine from the base config).
METHOD_LR = {
    "full": 5e-5,  # full fine-tuning: BERT / LLM fine-tuning range
    "lora": 5e-4,  # Hu et al. 2021 / HF PEFT examples
    "dora": 5e-4,  # Liu et al. 2024: LoRA's learning rate
    "ia3": 3e-3,  # Liu et al. 2022
    "adapter": 1e-3,  # Houlsby et al. 2019: 1e-4 .. 1e-3
    "bitfit": 1e-3,  # Ben Zaken et al. 2022: 1e-4 .. 1e-3
    "prefix": 5e-3,  # Li & Liang 2021 / HF PEFT prefix-tuning examples
    "prompt": 3e-2,  # Lester et al. 2021 use 0.3 with Adafactor; AdamW wants less
}
# Methods a base model cannot run (every method runs on both bases now).
UNSUPPORTED: dict[str, tuple[str, ...]] = {}


def get_config(arg="smollm2"):
    if arg == "smollm2":
        c = default.get_config()
        c.max_steps = 80  # equal for every method
        c.eval.every = 40
        c.eval.zero_shot = False  # the same base for every method: measured once in the README
        c.peft.bitfit.include_norms = True  # Llama has no biases: BitFit's norm-scale variant
        # Li & Liang's init from real words: PEFT's random N(0, 1) prefix swamps the
        # pretrained attention (measured: 0.523 test, below the 0.775 zero-shot).
        c.peft.prefix.init_text = (
            "Classify the sentiment of this movie review as positive or negative."
        )
    elif arg == "minilm":
        c = minilm_rt_lora.get_config()
        c.max_steps = 265  # one epoch
        c.peft.dora.target_modules = c.peft.lora.target_modules
        c.peft.ia3.target_modules = r".*/attention/(key|value)|.*/mlp/output"
        c.peft.ia3.feedforward_modules = r".*/mlp/output"
        c.peft.adapter.attn_output = r".*/attention/output"
        c.peft.adapter.mlp_output = r".*/mlp/output"
    else:
        raise ValueError(f"configs/methods_rt.py: argument 'smollm2' or 'minilm', not {arg!r}")
    c.checkpoint.every = c.max_steps
    return c


def get_sweep(arg="smollm2"):
    skip = UNSUPPORTED.get(arg, ())
    return [
        {"peft.method": method, "optim.learning_rate": lr}
        for method, lr in METHOD_LR.items()
        if method not in skip
    ]
