"""Where a train step's time goes: per-HLO-op times from a jax.profiler trace.

  python benchmarks/profile_step.py --workload=llama-tiny --mode=lora --top=30
  python benchmarks/profile_step.py --workload=llama-1b --dtype=bfloat16 --mode=full  # GPU

Runs the step_time.py workload, traces 3 steps after warm-up, and prints the
mean time per step of every compiled op (fusions, dots, library calls), marked
fwd or bwd from its metadata, plus totals per phase and kind (gemm, attention,
elementwise or reduction fusion, copy, ...; read from the optimized HLO). On CPU
the times are the thunks' and ops that ran concurrently add up to more than the
step's wall time. On a GPU they are the kernels' (summed per HLO op). The busy
time (some op running, on any thread or stream) and the traced span per step are
printed too: span - busy is time the device sat idle (launch gaps, host syncs,
runtime work between thunks). With --out the table is JSON;
with --trace_out the raw trace (.xplane.pb) is copied there.
"""

import argparse
import collections
import contextlib
import gzip
import json
import pathlib
import re
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import paired_ab  # noqa: E402
import step_time  # noqa: E402

TRACED_STEPS = 3
# Thunk-executor bookkeeping and control flow that contain the real ops (CPU).
CONTAINERS = ("ThunkExecutor", "SlinkyThreadPool", "while", "call", "conditional")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][a-z\-]*)\((.*)$", re.M)


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO op name -> (phase, kind): phase 'bwd' (autodiff transpose) or 'fwd' from
    op_name metadata; kind from the opcode and, for fusions and library calls, what
    they run."""
    table = {}
    for m in _INSTRUCTION.finditer(hlo_text):
        name, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]+)"', rest)
        phase = "bwd" if op_name and "transpose(jvp" in op_name.group(1) else "fwd"
        table[name] = (phase, _kind(name, opcode, rest))
    return table


def _kind(name: str, opcode: str, rest: str) -> str:
    if opcode == "dot" or name.startswith("ynn") or "__ynn" in rest:
        return "gemm"
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1) if target else ""
        if "fmha" in target or "attention" in target.lower():
            return "attention"
        if "gemm" in target or "matmul" in target.lower():
            return "gemm"
        return f"custom-call {target}"
    if opcode == "fusion":
        if "__triton_gemm" in rest or "__cudnn$fusion" in rest or name.startswith("gemm_fusion"):
            return "gemm"
        if "__triton" in rest:
            return "triton fusion"
        if "fmha" in rest or "flash" in rest:
            return "attention"
        if "dynamic" in name and "slice" in name:  # a scan's per-layer slices and stacking
            return "dynamic slice/update"
        if "kind=kInput" in rest or name.startswith("input_") or "reduce" in name:
            return "reduction fusion"
        if "kind=kLoop" in rest or name.startswith("loop_"):
            return "elementwise fusion"
        return "other fusion"
    if opcode in ("copy", "transpose"):
        return "copy/transpose"
    if opcode.startswith("dynamic"):
        return "dynamic slice/update"
    return opcode


def phase_kind(table: dict, op: str) -> tuple[str, str]:
    """An op's (phase, kind); ops the printed HLO lacks (renamed by late passes, such as
    the ones a GPU trace names) get phase '?' and their kind from their name."""
    return table.get(op) or ("?", _kind(op, "fusion", "") if "fusion" in op else "unknown")


def _union_ns(intervals) -> int:
    busy, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def summarize(trace_dir: str, table: dict, steps: int) -> dict:
    """-> per-op and per-(phase, kind) ms per step, and on a GPU its busy/span ms."""
    from jax.profiler import ProfileData

    per_op, per_kind, intervals = collections.Counter(), collections.Counter(), []
    calls = collections.Counter()
    for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
        profile = ProfileData.from_file(str(path))  # planes refer into it: keep it alive
        planes = list(profile.planes)
        device_planes = [p for p in planes if p.name.startswith("/device:GPU")]
        for plane in device_planes or planes:
            for line in plane.lines:
                if "python" in line.name or (device_planes and "Stream" not in line.name):
                    continue
                for event in line.events:
                    if not device_planes and event.name.startswith(CONTAINERS):
                        continue
                    # A GPU kernel names its HLO op in a stat (an op may launch several).
                    op = (
                        dict(event.stats).get("hlo_op", event.name) if device_planes else event.name
                    )
                    ms = event.duration_ns / 1e6 / steps
                    per_op[op] += ms
                    calls[op] += 1
                    phase, kind = phase_kind(table, op)
                    per_kind[f"{phase} {kind}"] += ms
                    intervals.append((event.start_ns, event.end_ns))
    out = {"per_kind": dict(per_kind.most_common()), "per_op": per_op}
    out["calls_per_step"] = {op: n / steps for op, n in calls.items()}
    if intervals:  # a GPU's kernels, or the CPU thunks of all threads
        where = "gpu" if device_planes else "cpu"
        out[f"{where}_busy_ms_per_step"] = _union_ns(intervals) / 1e6 / steps
        span = max(e for _, e in intervals) - min(s for s, _ in intervals)
        out[f"{where}_span_ms_per_step"] = span / 1e6 / steps
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="llama-tiny", choices=list(step_time.WORKLOADS))
    parser.add_argument("--mode", default="lora", choices=step_time.MODES)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", default="auto", help="ftlib's model.attention")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="")
    parser.add_argument("--trace_out", default="", help="folder for the raw .xplane.pb")
    parser.add_argument("--hlo_out", default="", help="file for the optimized HLO (.gz: gzip)")
    parser.add_argument(
        "--variant",
        default="ftlib",
        choices=[*paired_ab.VARIANTS, *paired_ab.COMPILER_OPTIONS],
        help="a paired_ab.py variant to profile instead of ftlib",
    )
    args = parser.parse_args()

    import jax

    with paired_ab.VARIANTS.get(args.variant, contextlib.nullcontext)():
        cfg = step_time.llama_config(args.workload, args.dtype, args.attention)
        step, state, frozen, _ = step_time.train_setup(cfg, args.mode, 10)
        [b] = step_time.batches(args.workload, 1)
        # Run this executable, not another compile by jit: the table's op names are its own.
        step = step.lower(state, frozen, b).compile(paired_ab.COMPILER_OPTIONS.get(args.variant))
    hlo = step.as_text()
    table = op_table(hlo)
    if args.hlo_out:
        data = hlo.encode()
        pathlib.Path(args.hlo_out).write_bytes(
            gzip.compress(data) if args.hlo_out.endswith(".gz") else data
        )
    for _ in range(3):
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
    trace_dir = tempfile.mkdtemp(prefix="ftlib_profile_")
    jax.profiler.start_trace(trace_dir)
    for _ in range(TRACED_STEPS):
        state, metrics = step(state, frozen, b)
        metrics["loss"].block_until_ready()
    jax.profiler.stop_trace()
    if args.trace_out:
        pathlib.Path(args.trace_out).mkdir(parents=True, exist_ok=True)
        for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
            shutil.copy(path, pathlib.Path(args.trace_out) / path.name)

    summary = summarize(trace_dir, table, TRACED_STEPS)
    title = f"{args.workload} {args.mode} {args.dtype} ({args.variant}): op time per step (ms)"
    print(f"{title}, {TRACED_STEPS} steps traced")
    for where in ("gpu", "cpu"):
        if f"{where}_busy_ms_per_step" in summary:
            print(
                f"  {where.upper()} busy (some op running) {summary[f'{where}_busy_ms_per_step']:.1f}"
                f" ms of a {summary[f'{where}_span_ms_per_step']:.1f} ms span per step"
            )
    for kind, ms in summary["per_kind"].items():
        print(f"  {ms:8.1f}  {kind}")
    calls = summary.pop("calls_per_step")
    rows = [
        dict(zip(("phase", "kind"), phase_kind(table, op)))
        | {"op": op, "ms_per_step": ms, "calls_per_step": calls[op]}
        for op, ms in summary.pop("per_op").most_common(args.top)
    ]
    for row in rows:
        print(
            f"  {row['ms_per_step']:8.2f}  {row['calls_per_step']:4.0f}x  {row['phase']}  "
            f"{row['kind']:20s} {row['op']}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary | {"top_ops": rows}, f, indent=2)


if __name__ == "__main__":
    main()
