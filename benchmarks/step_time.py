"""Train-step time of ftlib (and HF transformers + peft) on fixed Llama workloads; writes JSON.

  python benchmarks/step_time.py --vs=hf --out=benchmarks/step_time.json
  python benchmarks/step_time.py --workloads=llama-tiny --modes=lora --out=/tmp/t.json
  python benchmarks/step_time.py --vs=hf --workloads=llama-tiny --rounds=3  # median ratio
  python benchmarks/step_time.py --workloads=llama-1b --dtype=bfloat16 --vs=hf  # on a GPU

Each (workload, mode) runs in a fresh process: 3 warm-up steps, then 10 timed
steps, each synchronised on the loss. Reported: median step seconds, tokens/s,
compile seconds (first step - median), peak RSS, model FLOPs per step, achieved
GFLOP/s and the GEMM peak measured in the same process (a jitted fp32 matmul of
the model's largest shape). With --vs=hf (needs `pip install -e .[hf]`: torch
CPU, peft) each ftlib run is followed by the same work in HF LlamaForCausalLM +
peft.get_peft_model + torch.optim.AdamW (hf_peft.py) on the same batches, in its own process,
and the ftlib/HF step-time ratio is printed per workload and mode. --rounds=N
repeats each pair N times (order swapped every other round; each record names its
round) and also prints the median of the N ratios. ftlib's process
restarts itself with its malloc settings as its CLIs do (ftlib.malloc_env: glibc's
huge-page tunable and the block cache); HF's runs as launched: set
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to give it huge pages too.

On a GPU both stacks run there. --dtype=bfloat16 is mixed precision in both: fp32
params and optimizer, bf16 matmuls (ftlib: model.dtype; HF: torch.autocast). fp32
runs use full fp32 matmuls in both (JAX's GPU default would be TF32; torch's is not).
GPU records add the device's peak memory and the MFU against the chip's dense
datasheet rate (bf16 or fp32, GPU_PEAK_TFLOPS).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed


class Workload(NamedTuple):
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    batch: int
    seq: int


WORKLOADS = {
    "llama-tiny": Workload(8192, 256, 688, 4, 4, 4, 8, 256),
    "llama-small": Workload(32000, 512, 1376, 8, 8, 8, 4, 512),
    # TinyLlama-1.1B's shape (GQA, 4 KV heads), for a GPU: 16k tokens per step.
    "llama-1b": Workload(32000, 2048, 5632, 22, 32, 4, 8, 2048),
    # SmolLM2-135M's shape (untied here) at about the default run's batch: 30 layers,
    # which the CPU runs under the layer scan, and short rows.
    "smollm2-135m": Workload(49152, 576, 1536, 30, 9, 3, 8, 64),
}
# Dense datasheet TFLOP/s by device kind and dtype (SXM parts); the MFU denominator.
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 66.9},
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 66.9},
}
MODES = ("full", "lora")
WARMUP, TIMED = 3, 10
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_flops(w: Workload, trainable_matmul_params: int) -> int:
    """Matmul FLOPs of one step: forward 2NT, backward 2NT for activations plus
    2N_train T for trainable weights; attention scores and values 4 B T^2 D per
    layer forward, twice that backward (the whole T x T square, as MFU is usually
    counted, though causal kernels skip half)."""
    d, kv = w.hidden, w.hidden // w.heads * w.kv_heads
    tokens = w.batch * w.seq
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * w.intermediate  # q, o; k, v; MLP
    n = w.layers * per_layer + w.vocab * d  # projections + LM head
    dense = (4 * n + 2 * trainable_matmul_params) * tokens
    attention = 3 * 4 * w.batch * w.seq * w.seq * d * w.layers
    return dense + attention


def train_setup(cfg, mode: str, total_steps: int, grad_clip_norm: float = 0.0):
    """The benchmark's method and optimizer on a Llama of `cfg` -> (jitted donated
    train step, state, frozen, mask): `full`, or LoRA r=8, alpha=16, no dropout on
    all projections; AdamW lr 1e-4, wd 0.01 on every param (as torch's AdamW), no
    clipping (unless `grad_clip_norm`: the default config's 1.0), constant schedule."""
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
    c.optim.update(dict(no_decay="", grad_clip_norm=grad_clip_norm, grad_accum_steps=1))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, c.peft)
    tx = optim.make_optimizer(c.optim, total_steps)
    graphdef, state, frozen = steps.init_train_state(model, mask, tx)
    return jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=0), state, frozen, mask


def llama_config(workload: str, dtype: str = "float32", attention: str = "auto"):
    """The workload's Llama: untied embeddings, no biases, RMSNorm eps 1e-5, theta 1e4;
    fp32 params, matmuls in `dtype`."""
    from ftlib.models.llama import LlamaConfig

    w = WORKLOADS[workload]
    return LlamaConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_layers=w.layers,
        num_heads=w.heads,
        num_kv_heads=w.kv_heads,
        head_dim=w.hidden // w.heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=False,
        dtype=dtype,
        attention=attention,
    )


def token_ids(workload: str, n: int):
    """The issue's data: numpy default_rng(1234).integers(0, vocab, (n, batch, seq))."""
    import numpy as np

    vocab, *_, batch, seq = WORKLOADS[workload]
    return np.random.default_rng(1234).integers(0, vocab, (n, batch, seq))


def batches(workload: str, n: int) -> list[dict]:
    """token_ids as ftlib batches: one packed segment per row, next-token loss on all
    tokens."""
    import numpy as np

    *_, batch, seq = WORKLOADS[workload]
    ids = token_ids(workload, n).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return [
        dict(input_ids=ids[i], loss_mask=ones, segment_ids=ones, positions=positions)
        for i in range(n)
    ]


def run_one(workload: str, mode: str, dtype: str, attention: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftlib.models.attention import resolve_impl
    from ftlib.models.layer_stack import scans_layers

    gpu = jax.default_backend() == "gpu"
    if gpu and dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32, as torch
    w = WORKLOADS[workload]
    cfg = llama_config(workload, dtype, attention)
    step, state, frozen, mask = train_setup(cfg, mode, WARMUP + TIMED)
    times = []
    for b in batches(workload, WARMUP + TIMED):
        start = time.perf_counter()
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)

    big = max([(w.hidden, w.intermediate), (w.hidden, w.vocab)], key=lambda s: s[0] * s[1])
    rng = np.random.default_rng(0)  # not ones: a GPU multiplies constants faster
    x = jnp.asarray(rng.normal(size=(w.batch * w.seq, big[0])), dtype)
    y = jnp.asarray(rng.normal(size=big), dtype)
    # ftlib's product, as Linear runs it: MKL for fp32 on one CPU device, else XLA's
    # (with bf16 accumulating in fp32 on CPU).
    from ftlib.models.layers import matmul

    gemm = jax.jit(matmul)
    gemm(x, y).block_until_ready()
    gemm_times = []
    for _ in range(5):
        start = time.perf_counter()
        gemm(x, y).block_until_ready()
        gemm_times.append(time.perf_counter() - start)
    gemm_peak = 2 * w.batch * w.seq * big[0] * big[1] / float(np.median(gemm_times)) / 1e9

    trainable_matmul = sum(
        n
        for p, n in ((p, int(np.prod(s))) for p, s in mask.shapes.items())
        if mask.trainable[p] and not p.endswith(("scale", "bias", "embedding"))
    )
    flops = model_flops(w, trainable_matmul)
    record = make_record(
        "ftlib", workload, mode, times, mask.count(), mask.count(True), flops, gemm_peak
    )
    device = jax.devices()[0]
    record.update(
        dtype=dtype,
        attention=resolve_impl(attention, dtype, w.seq, cfg.head_dim, True),
        layers="scan" if scans_layers(cfg.scan_layers, cfg.num_layers) else "loop",
    )
    if gpu:
        peak_mb = device.memory_stats()["peak_bytes_in_use"] / 2**20
        record.update(gpu_fields(device.device_kind, dtype, record, peak_mb))
    return record


def gpu_fields(kind: str, dtype: str, record: dict, peak_mem_mb: float) -> dict:
    peak = GPU_PEAK_TFLOPS.get(kind, {}).get(dtype)
    return {
        "device": kind,
        "device_peak_mem_mb": peak_mem_mb,
        "peak_tflops_datasheet": peak,
        "mfu": record["gflops_per_s"] / (peak * 1e3) if peak else None,
    }


def make_record(stack, workload, mode, times, total, trainable, flops, gemm_peak) -> dict:
    """One JSON record; the first `WARMUP` step times are excluded from the median."""
    import numpy as np

    batch, seq = WORKLOADS[workload][-2:]
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
        # ftlib's CLIs set glibc.malloc.hugetlb=1 and preload the block cache
        # (ftlib.malloc_env); HF runs as launched.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def _run_in_subprocess(stack: str, workload: str, mode: str, dtype: str, attention: str):
    """-> the run's record, or None (its error printed) if the process failed."""
    run = ["--run", stack, workload, mode, dtype, attention]
    out = subprocess.run([sys.executable, __file__, *run], capture_output=True, text=True)
    if out.returncode:
        print(f"{stack} {workload}/{mode} failed:\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(record: dict) -> None:
    print(
        f"{record['stack']:8s} {record['workload']:12s} {record['mode']:5s} "
        f"{record['median_step_s']:.3f} s/step {record['tokens_per_s']:8.0f} tok/s  "
        f"compile {record['compile_s']:.1f} s  rss {record['peak_rss_mb']:.0f} MB  "
        f"{record['gflops_per_s']:.0f} GFLOP/s "
        f"({record['gflops_per_s'] / record['gemm_peak_gflops']:.0%} of GEMM)  "
        f"params {record['params_trainable']:,}/{record['params_total']:,}"
        + (f"  MFU {record['mfu']:.1%}" if record.get("mfu") else "")
        + (f"  mem {record['device_peak_mem_mb']:.0f} MB" if "device" in record else ""),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="llama-tiny,llama-small")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", default="auto", help="ftlib's model.attention")
    parser.add_argument("--vs", choices=("", "hf"), default="", help="also run HF PEFT")
    parser.add_argument("--out", default="", help="JSON file, rewritten after every run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="pairs of processes per row (--vs=hf: median ratio)"
    )
    parser.add_argument("--run", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        stack, workload, mode, dtype, attention = args.run
        if stack == "ftlib":
            from ftlib import malloc_env

            malloc_env.restart()  # as ftlib's CLIs do
            print(json.dumps(run_one(workload, mode, dtype, attention)))
        else:
            import hf_peft  # noqa: PLC0415 - torch only in HF's processes

            print(json.dumps(hf_peft.run(workload, mode, dtype)))
        return
    stacks = ("ftlib", "hf-peft") if args.vs == "hf" else ("ftlib",)
    records = []
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            ratios = []
            for round_ in range(args.rounds):
                # Alternate the stacks, first one then the other, so noise hits both alike.
                pair = {}
                for stack in stacks[:: -1 if round_ % 2 else 1]:
                    record = _run_in_subprocess(stack, workload, mode, args.dtype, args.attention)
                    if record is None:
                        continue
                    pair[stack] = record | {"round": round_}
                    records.append(pair[stack])
                    _print(record)
                    if args.out:
                        pathlib.Path(args.out).write_text(json.dumps(records, indent=2))
                if len(pair) == 2:
                    hf_s = pair["hf-peft"]["median_step_s"]
                    ratios.append(pair["ftlib"]["median_step_s"] / hf_s)
                    print(
                        f"ratio ftlib/hf-peft {workload} {mode}: {ratios[-1]:.2f} "
                        f"(floor at ftlib's GEMM peak: "
                        f"{pair['ftlib']['gemm_bound_step_s'] / hf_s:.2f})",
                        flush=True,
                    )
            if len(ratios) > 1:
                print(
                    f"median ratio ftlib/hf-peft {workload} {mode} over {len(ratios)} rounds: "
                    f"{statistics.median(ratios):.2f} "
                    f"(min {min(ratios):.2f}, max {max(ratios):.2f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
