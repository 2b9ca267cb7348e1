"""ftlib's and HF PEFT's train steps alternating in one process: a paired ratio.

  python benchmarks/vs_hf_paired.py --workload=llama-small --mode=lora --rounds=12

step_time.py --vs=hf runs each stack in its own fresh process, as the performance
issue's protocol says. On a shared VM whose speed drifts by 30% within a minute
(benchmarks/README.md), those process pairs give ratios anywhere from 0.67 to 1.20
for the same code. Here both stacks are built in one process (step_time.train_setup
and hf_peft.setup: same model, data, optimizer), then every round runs one step
of each, the order swapped every other round, so a slow spell slows both. Reported:
each stack's median step seconds and the median (and quartiles) of the per-round
ratios ftlib / HF. Both stacks get glibc's huge-page tunable (ftlib's CLIs set it);
peak memory and compile time are step_time.py's business, not this script's.

torch's OpenMP threads spin-wait after each parallel region, on the same two cores
XLA's threads then need: with that default, ftlib's steps here took 0.754 s against
0.623 s with OMP_WAIT_POLICY=PASSIVE (llama-tiny full, 12 rounds each), and HF's
0.637 against 0.587 s. So this script sets PASSIVE unless the environment says
otherwise.
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import hf_peft  # noqa: E402
import step_time  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="llama-tiny", choices=list(step_time.WORKLOADS))
    parser.add_argument("--mode", default="lora", choices=step_time.MODES)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds after warm-up")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts OpenMP
    from ftlib import malloc_env

    malloc_env.restart()
    import numpy as np

    n = step_time.WARMUP + args.rounds
    cfg = step_time.llama_config(args.workload)
    ftlib_step, state, frozen, _ = step_time.train_setup(cfg, args.mode, n)
    batches = step_time.batches(args.workload, n)
    hf_step, *_ = hf_peft.setup(args.workload, args.mode, "float32")
    ids = step_time.token_ids(args.workload, n)

    def run_ftlib(i):
        nonlocal state
        state, metrics = ftlib_step(state, frozen, batches[i])
        metrics["loss"].block_until_ready()

    times = {"ftlib": [], "hf-peft": []}
    stacks = {"ftlib": run_ftlib, "hf-peft": lambda i: hf_step(ids[i])}
    for i in range(n):
        for name in list(stacks)[:: -1 if i % 2 else 1]:
            start = time.perf_counter()
            stacks[name](i)
            times[name].append(time.perf_counter() - start)
    ftlib_s, hf_s = (np.asarray(times[k][step_time.WARMUP :]) for k in ("ftlib", "hf-peft"))
    ratios = ftlib_s / hf_s
    record = {
        "workload": args.workload,
        "mode": args.mode,
        "rounds": args.rounds,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "ftlib_median_step_s": float(np.median(ftlib_s)),
        "hf_median_step_s": float(np.median(hf_s)),
        "paired_ratio_median": float(np.median(ratios)),
        "paired_ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 75])],
        "step_times_s": times,
    }
    print(
        f"{args.workload} {args.mode}: ftlib {record['ftlib_median_step_s']:.3f} s, "
        f"HF PEFT {record['hf_median_step_s']:.3f} s per step; ftlib / HF per round: median "
        f"{record['paired_ratio_median']:.3f} (quartiles "
        f"{record['paired_ratio_quartiles'][0]:.3f}-{record['paired_ratio_quartiles'][1]:.3f}, "
        f"{args.rounds} rounds)",
        flush=True,
    )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
