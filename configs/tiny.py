"""A tiny random-init Llama on the shipped RT snippets, with the SmolLM2
tokenizer: seconds per run, for tests and quick checks.

  python train.py --config=configs/tiny.py --workdir=runs/tiny --config.max_steps=20
  python train.py --config=configs/tiny.py:lora --workdir=runs/tiny_lora
"""

from configs import default


def get_config(arg="full"):
    c = default.get_config()
    c.max_steps = 60
    c.log_every = 5
    c.model.checkpoint = ""
    c.model.tokenizer = "smollm2-135m-instruct"
    c.model.hidden_size = 64
    c.model.intermediate_size = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.peft.method = arg or "full"
    c.optim.learning_rate = 3e-3
    c.data.seq_len = 64
    c.data.pad_to_multiple = 0  # one batch shape: one compile (compute is trivial here)
    c.eval.every = 10
    c.eval.max_examples = 64
    c.eval.metric = "loss"
    c.eval.mode = "min"
    c.eval.zero_shot = False
    c.checkpoint.every = 10
    c.checkpoint.async_save = False
    return c


def get_sweep(arg=None):
    """Learning rate x method; `python -m ftlib.sweep --config=configs/tiny.py --workdir=DIR`."""
    del arg
    return [
        {"peft.method": m, "optim.learning_rate": lr}
        for m in ("full", "lora")
        for lr in (1e-3, 3e-3)
    ]
