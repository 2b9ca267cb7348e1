"""Train-step compile time against depth: layers under lax.scan vs a Python loop.

  python benchmarks/compile_depth.py --out=benchmarks/compile_depth.json

With scan the step's HLO holds one layer body whatever the depth, so compile time
stays flat; unrolled, it grows with every layer. Each (layers, scan) pair
compiles the jitted train step (LoRA on all projections, hidden 256) once via
`jit(...).lower(...).compile()`, in one process (the shapes differ, so no cache hits).
"""

import argparse
import json
import time

import numpy as np
from step_time import train_setup  # same directory: the benchmark's method and optimizer

from ftlib.models.llama import LlamaConfig

DEPTHS = (4, 16, 32)
BATCH, SEQ = 4, 128


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        tie_embeddings=False,
        scan_layers=scan,
    )
    step, state, frozen, _ = train_setup(cfg, "lora", 10)
    ones = np.ones((BATCH, SEQ), np.int32)
    batch = dict(
        input_ids=ones,
        loss_mask=ones,
        segment_ids=ones,
        positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)),
    )
    start = time.perf_counter()
    step.lower(state, frozen, batch).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    records = []
    for layers in map(int, args.depths.split(",")):
        for scan in (True, False):
            seconds = compile_seconds(layers, scan)
            records.append({"layers": layers, "scan_layers": scan, "compile_s": seconds})
            print(f"layers {layers:3d} scan={scan!s:5s} compile {seconds:6.1f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
