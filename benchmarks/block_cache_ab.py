"""ftlib's train step with and without the block cache (ftlib/block_cache.cc), in
alternating fresh processes; writes JSON.

  python benchmarks/block_cache_ab.py --rounds=3 --out=benchmarks/results/block_cache_ab.json

Each process restarts itself as ftlib's CLIs do (ftlib.malloc_env), with
FTLIB_BLOCK_CACHE=1 or 0, then runs step_time.py's workload for 3 warm-up and 20 timed
steps, each synchronised on the loss. Per step (medians): wall seconds, system and user
CPU seconds (the kernel's page zeroing is system time), minor page faults; and the
process's peak RSS. Printed: the ratio of wall medians, cache on / off, per round.
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

import step_time

WARMUP, TIMED = 3, 20


def run_one(workload: str, mode: str) -> dict:
    cfg = step_time.llama_config(workload)
    step, state, frozen, _ = step_time.train_setup(cfg, mode, WARMUP + TIMED)
    rows = []
    for batch in step_time.batches(workload, WARMUP + TIMED):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = step(state, frozen, batch)
        metrics["loss"].block_until_ready()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            {
                "wall_s": wall,
                "sys_s": after.ru_stime - before.ru_stime,
                "user_s": after.ru_utime - before.ru_utime,
                "minor_faults": after.ru_minflt - before.ru_minflt,
            }
        )
    timed = rows[WARMUP:]
    return {
        "workload": workload,
        "mode": mode,
        "block_cache": "block_cache" in os.environ.get("LD_PRELOAD", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        **{f"median_{k}": statistics.median(r[k] for r in timed) for k in timed[0]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="llama-tiny,llama-small")
    parser.add_argument("--modes", default=",".join(step_time.MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        from ftlib import malloc_env

        malloc_env.restart()
        print(json.dumps(run_one(*args.run)))
        return
    if "LD_PRELOAD" in os.environ:
        sys.exit("unset LD_PRELOAD: the processes with the cache on need to add it")
    records = []
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            for round_ in range(args.rounds):
                pair = {}
                for on in (True, False)[:: -1 if round_ % 2 else 1]:
                    env = dict(os.environ, FTLIB_BLOCK_CACHE="1" if on else "0")
                    cmd = [sys.executable, __file__, "--run", workload, mode]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if done.returncode:
                        sys.exit(f"{workload}/{mode} failed:\n{done.stderr[-3000:]}")
                    record = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_}
                    if record["block_cache"] != on:
                        sys.exit(f"block cache {'not ' if on else ''}preloaded: {record}")
                    pair[on] = record
                    records.append(record)
                ratio = pair[True]["median_wall_s"] / pair[False]["median_wall_s"]
                print(
                    f"{workload} {mode} round {round_}: on/off {ratio:.3f}  "
                    + "  ".join(
                        f"{'on' if on else 'off'} {r['median_wall_s']:.3f} s "
                        f"sys {r['median_sys_s']:.3f} faults {r['median_minor_faults']:.0f} "
                        f"rss {r['peak_rss_mb']:.0f} MB"
                        for on, r in pair.items()
                    ),
                    flush=True,
                )
                if args.out:
                    pathlib.Path(args.out).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
