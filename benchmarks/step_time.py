"""Train-step time of ftlib (and HF transformers + peft) on fixed Llama workloads; writes JSON.

  python benchmarks/step_time.py --vs=hf --out=benchmarks/step_time.json
  python benchmarks/step_time.py --workloads=llama-tiny --modes=lora --out=/tmp/t.json

Each (workload, mode) runs in a fresh process: 3 warm-up steps, then 10 timed
steps, each synchronised on the loss. Reported: median step seconds, tokens/s,
compile seconds (first step - median), peak RSS, model FLOPs per step, achieved
GFLOP/s and the GEMM peak measured in the same process (a jitted fp32 matmul of
the model's largest shape). With --vs=hf (needs `pip install -e .[hf]`: torch
CPU, peft) each ftlib run is followed by the same work in HF LlamaForCausalLM +
peft.get_peft_model + torch.optim.AdamW on the same batches, in its own process,
and the ftlib/HF step-time ratio is printed per workload and mode.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed

WORKLOADS = {
    # name: (vocab, hidden, intermediate, layers, heads, batch, seq)
    "llama-tiny": (8192, 256, 688, 4, 4, 8, 256),
    "llama-small": (32000, 512, 1376, 8, 8, 4, 512),
}
MODES = ("full", "lora")
WARMUP, TIMED = 3, 10
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_flops(vocab, d, f, layers, batch, seq, trainable_matmul_params):
    """Matmul FLOPs of one step: forward 2NT, backward 2NT for activations plus
    2N_train T for trainable weights; attention scores and values 4 B T^2 D per
    layer forward, twice that backward."""
    tokens = batch * seq
    n = layers * (4 * d * d + 3 * d * f) + vocab * d  # projections + LM head
    dense = (4 * n + 2 * trainable_matmul_params) * tokens
    attention = 3 * 4 * batch * seq * seq * d * layers
    return dense + attention


def train_setup(cfg, mode: str, total_steps: int):
    """The benchmark's method and optimizer on a Llama of `cfg` -> (jitted donated
    train step, state, frozen, mask): `full`, or LoRA r=8, alpha=16, no dropout on
    all projections; AdamW lr 1e-4, wd 0.01 on every param (as torch's AdamW), no
    clipping, constant schedule."""
    import jax
    from flax import nnx

    from configs import default
    from ftlib import optim, peft, steps
    from ftlib.models.llama import Llama

    c = default.get_config()
    c.peft.method = mode
    c.peft.lora.update(dict(rank=8, alpha=16.0, dropout=0.0, rslora=False))
    c.peft.lora.target_modules = r".*/(q|k|v|o|gate|up|down)_proj"
    c.optim.update(dict(learning_rate=1e-4, warmup_steps=0, end_lr_ratio=1.0, weight_decay=0.01))
    c.optim.update(dict(no_decay="", grad_clip_norm=0.0, grad_accum_steps=1))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, c.peft)
    tx = optim.make_optimizer(c.optim, total_steps)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    return jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=0), state, frozen, mask


def llama_config(workload: str):
    """The workload's Llama: untied embeddings, no biases, RMSNorm eps 1e-5, theta 1e4."""
    from ftlib.models.llama import LlamaConfig

    vocab, d, f, layers, heads, _, _ = WORKLOADS[workload]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=False,
    )


def batches(workload: str, n: int) -> list[dict]:
    """The issue's data as ftlib batches: ids from numpy default_rng(1234).integers(0,
    vocab, (n, batch, seq)), one packed segment per row, next-token loss on all tokens."""
    import numpy as np

    vocab, *_, batch, seq = WORKLOADS[workload]
    ids = np.random.default_rng(1234).integers(0, vocab, (n, batch, seq)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return [
        dict(input_ids=ids[i], loss_mask=ones, segment_ids=ones, positions=positions)
        for i in range(n)
    ]


def run_one(workload: str, mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    vocab, d, f, layers, heads, batch, seq = WORKLOADS[workload]
    step, state, frozen, mask = train_setup(llama_config(workload), mode, WARMUP + TIMED)
    times = []
    for b in batches(workload, WARMUP + TIMED):
        start = time.perf_counter()
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)

    big = max([(d, f), (d, vocab)], key=lambda s: s[0] * s[1])
    x, w = jnp.ones((batch * seq, big[0])), jnp.ones(big)
    gemm = jax.jit(jnp.dot)
    gemm(x, w).block_until_ready()
    gemm_times = []
    for _ in range(5):
        start = time.perf_counter()
        gemm(x, w).block_until_ready()
        gemm_times.append(time.perf_counter() - start)
    gemm_peak = 2 * batch * seq * big[0] * big[1] / float(np.median(gemm_times)) / 1e9

    trainable_matmul = sum(
        n
        for p, n in ((p, int(np.prod(s))) for p, s in mask.shapes.items())
        if mask.trainable[p] and not p.endswith(("scale", "bias", "embedding"))
    )
    flops = model_flops(vocab, d, f, layers, batch, seq, trainable_matmul)
    return _record("ftlib", workload, mode, times, mask.count(), mask.count(True), flops, gemm_peak)


def run_hf(workload: str, mode: str) -> dict:
    """The same steps in HF transformers (PyTorch, CPU, fp32) + peft."""
    import numpy as np
    import torch
    import transformers

    vocab, d, f, layers, heads, batch, seq = WORKLOADS[workload]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        initializer_range=0.02,
    )
    model = transformers.LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        import peft

        lora = peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        model = peft.get_peft_model(model, lora)
        total = sum(p.numel() for p in model.parameters())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ids = np.random.default_rng(1234).integers(0, vocab, (WARMUP + TIMED, batch, seq))
    times = []
    for i in range(WARMUP + TIMED):
        x = torch.from_numpy(ids[i])
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        loss.item()
        times.append(time.perf_counter() - start)
    # The embedding's gradient is a scatter, not a matmul; lm_head's is a matmul.
    trainable_matmul = sum(p.numel() for p in trainable if p.dim() == 2) - (
        vocab * d if mode == "full" else 0
    )
    flops = model_flops(vocab, d, f, layers, batch, seq, trainable_matmul)
    trainable_count = sum(p.numel() for p in trainable)
    gemm_peak = _torch_gemm_peak(vocab, d, f, batch, seq)
    record = _record("hf-peft", workload, mode, times, total, trainable_count, flops, gemm_peak)
    return {**record, "torch_threads": torch.get_num_threads()}


def _record(stack, workload, mode, times, total, trainable, flops, gemm_peak) -> dict:
    """One JSON record; the first `WARMUP` step times are excluded from the median."""
    import numpy as np

    batch, seq = WORKLOADS[workload][5:]
    median = float(np.median(times[WARMUP:]))
    return {
        "stack": stack,
        "workload": workload,
        "mode": mode,
        "median_step_s": median,
        "tokens_per_s": batch * seq / median,
        "compile_s": times[0] - median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_total": total,
        "params_trainable": trainable,
        "model_flops_per_step": flops,
        "gflops_per_s": flops / median / 1e9,
        "gemm_peak_gflops": gemm_peak,
        # The step's time if every model FLOP ran at this process's GEMM peak: a floor
        # for any implementation of the same math on this machine.
        "gemm_bound_step_s": flops / gemm_peak / 1e9,
        "step_times_s": times,
    }


def _torch_gemm_peak(vocab, d, f, batch, seq) -> float:
    import numpy as np
    import torch

    big = max([(d, f), (d, vocab)], key=lambda s: s[0] * s[1])
    x, w = torch.ones(batch * seq, big[0]), torch.ones(big)
    x @ w
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    return 2 * batch * seq * big[0] * big[1] / float(np.median(times)) / 1e9


def _run_in_subprocess(stack: str, workload: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--run", stack, workload, mode],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        sys.exit(f"{stack} {workload}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(record: dict) -> None:
    print(
        f"{record['stack']:8s} {record['workload']:12s} {record['mode']:5s} "
        f"{record['median_step_s']:.3f} s/step {record['tokens_per_s']:8.0f} tok/s  "
        f"compile {record['compile_s']:.1f} s  rss {record['peak_rss_mb']:.0f} MB  "
        f"{record['gflops_per_s']:.0f} GFLOP/s "
        f"({record['gflops_per_s'] / record['gemm_peak_gflops']:.0%} of GEMM)  "
        f"params {record['params_trainable']:,}/{record['params_total']:,}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--vs", choices=("", "hf"), default="", help="also run HF PEFT")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--run", nargs=3, metavar=("STACK", "WORKLOAD", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.run:
        stack, workload, mode = args.run
        print(json.dumps((run_one if stack == "ftlib" else run_hf)(workload, mode)))
        return
    stacks = ("ftlib", "hf-peft") if args.vs == "hf" else ("ftlib",)
    records = []
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            # Alternate the stacks so machine noise hits both alike.
            pair = {}
            for stack in stacks:
                pair[stack] = _run_in_subprocess(stack, workload, mode)
                records.append(pair[stack])
                _print(pair[stack])
            if len(pair) == 2:
                hf_s = pair["hf-peft"]["median_step_s"]
                print(
                    f"ratio ftlib/hf-peft {workload} {mode}: "
                    f"{pair['ftlib']['median_step_s'] / hf_s:.2f} "
                    f"(floor at ftlib's GEMM peak: {pair['ftlib']['gemm_bound_step_s'] / hf_s:.2f})",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
