"""Where a train step's time goes: per-HLO-op times from a jax.profiler trace.

  python benchmarks/profile_step.py --workload=llama-tiny --mode=lora --top=30

Runs the step_time.py workload, traces 3 steps after warm-up, and prints the
mean time per step of every compiled op (fusions, dots), marked fwd or bwd from
its metadata, plus totals per kind. Op times of ops that ran concurrently add
up to more than the step's wall time. With --out the table is also JSON.
"""

import argparse
import collections
import json
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import step_time  # noqa: E402

TRACED_STEPS = 3
# Thunk-executor bookkeeping and control flow that contain the real ops.
CONTAINERS = ("ThunkExecutor", "SlinkyThreadPool", "while", "call", "conditional")


def op_phases(hlo_text: str) -> dict[str, str]:
    """HLO op name -> 'bwd' (autodiff transpose) or 'fwd', from op_name metadata."""
    phases = {}
    for m in re.finditer(r"%(\S+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
        phases[m.group(1)] = "bwd" if "transpose(jvp" in m.group(2) else "fwd"
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="llama-tiny", choices=list(step_time.WORKLOADS))
    parser.add_argument("--mode", default="lora", choices=step_time.MODES)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import jax
    from jax.profiler import ProfileData

    step, state, frozen, _ = step_time.train_setup(
        step_time.llama_config(args.workload), args.mode, 10
    )
    [b] = step_time.batches(args.workload, 1)
    phases = op_phases(step.lower(state, frozen, b).compile().as_text())
    for _ in range(3):
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
    trace_dir = tempfile.mkdtemp(prefix="ftlib_profile_")
    jax.profiler.start_trace(trace_dir)
    for _ in range(TRACED_STEPS):
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
    jax.profiler.stop_trace()

    per_op, per_kind = collections.Counter(), collections.Counter()
    for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                if "python" in line.name:
                    continue
                for event in line.events:
                    if event.name.startswith(CONTAINERS):
                        continue
                    ms = event.duration_ns / 1e6 / TRACED_STEPS
                    per_op[event.name] += ms
                    kind = "dot" if event.name.startswith(("ynn", "dot")) else "other"
                    per_kind[f"{phases.get(event.name, 'fwd')} {kind}"] += ms
    print(f"{args.workload} {args.mode}: op time per step (ms), {TRACED_STEPS} steps traced")
    for kind, ms in per_kind.most_common():
        print(f"  {ms:8.1f}  {kind}")
    rows = [
        {"op": op, "phase": phases.get(op, "fwd"), "ms_per_step": ms}
        for op, ms in per_op.most_common(args.top)
    ]
    for row in rows:
        print(f"  {row['ms_per_step']:8.1f}  {row['phase']}  {row['op']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"per_kind": dict(per_kind), "top_ops": rows}, f, indent=2)


if __name__ == "__main__":
    main()
