"""Causal attention kernels (`model.attention`: blocked, cudnn, pallas) on this
machine's first device: each one's error against masked attention and its
forward + backward time at a workload's shape; writes JSON, prints the fastest
kernel that is right last.

  python benchmarks/attention_kernels.py --out=/tmp/attention.json  # on a GPU

Correctness, on two batches (packed: two segments and padding per row; unpacked:
one segment then padding), GQA, bf16 inputs, against fp32 `attention` on the same
(rounded) inputs, as ||got - want|| / ||want|| for the output and each gradient
over the real tokens (bf16 lands near 1e-2; a wrong mask near 1). Timing: the 1B
workload's attention (B 8, T 2048, 32 heads, 4 KV heads, head 64), jitted
value-and-grad, median of 20 synchronised calls, for rows of one segment
(unpacked) and of two (packed).
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ftlib.models.attention import attention, causal_attention  # noqa: E402

KERNELS = ("blocked", "cudnn", "pallas")
TOLERANCE = 3e-2  # relative L2 error a bf16 kernel must stay under


def _inputs(B, T, N, K, H, seg_BT, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, g = (jax.random.normal(k, (B, T, N, H), jnp.bfloat16) for k in (keys[0], keys[3]))
    k, v = (jax.random.normal(k, (B, T, K, H), jnp.bfloat16) for k in keys[1:3])
    mask = jnp.tril(jnp.ones((T, T), bool)) & (seg_BT[:, :, None] == seg_BT[:, None, :])
    return (q, k, v), g, mask


def value_and_grads(fn, g):
    """jit of (q, k, v) -> (fn's output, dq, dk, dv) for the output cotangent g."""

    def f(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(g))

    return jax.jit(f)


def check(impl: str, packed: bool) -> dict:
    """Relative L2 errors of the output and dq, dk, dv over the real tokens (padding
    rows get no cotangent: kernels may leave them at zero)."""
    B, T, N, K, H = 2, 256, 8, 2, 64
    seg = np.zeros((B, T), np.int32)
    seg[:, :230] = 1
    if packed:
        seg[:, 100:230] = 2
    seg[1, 60:] = 0
    seg = jnp.asarray(seg)
    qkv, g, mask = _inputs(B, T, N, K, H, seg, seed=0)
    real = (seg != 0)[:, :, None, None]
    g = g * real
    got = value_and_grads(lambda *a: causal_attention(*a, mask, segment_ids_BT=seg, impl=impl), g)(
        *qkv
    )
    f32 = [x.astype(jnp.float32) for x in (*qkv, g)]
    want = value_and_grads(lambda *a: attention(*a, mask), f32[3])(*f32[:3])
    got, want = (real * got[0], *got[1:]), (real * want[0], *want[1:])
    return {
        name: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)
    }


def time_kernel(impl: str, packed: bool, B=8, T=2048, N=32, K=4, H=64, reps=20) -> float:
    seg = jnp.ones((B, T), jnp.int32).at[:, T // 3 :].add(int(packed))
    qkv, g, mask = _inputs(B, T, N, K, H, seg, seed=1)
    f = value_and_grads(lambda *a: causal_attention(*a, mask, segment_ids_BT=seg, impl=impl), g)
    return median_s(f, qkv, reps)


def median_s(f, args, reps: int) -> float:
    """Median seconds of `reps` synchronised calls f(*args), after one to compile."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--impls", default=",".join(KERNELS))
    args = parser.parse_args()
    B, T, N, H = 8, 2048, 32, 64
    causal_flops = 3 * 4 * B * T * T * N * H / 2  # fwd + 2x bwd, the causal half
    records = []
    for impl in args.impls.split(","):
        record = {"impl": impl, "device": jax.devices()[0].device_kind}
        try:
            record["rel_err"] = check(impl, packed=False)
            record["rel_err_packed"] = check(impl, packed=True)
            record["median_s"] = time_kernel(impl, packed=False)
            record["causal_tflops_per_s"] = causal_flops / record["median_s"] / 1e12
            record["median_s_packed"] = time_kernel(impl, packed=True)
        except Exception as e:  # a kernel this device or version cannot run
            record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(records, indent=2))
    errors = ("rel_err", "rel_err_packed")
    right = [
        r
        for r in records
        if "median_s_packed" in r and max(max(r[e].values()) for e in errors) < TOLERANCE
    ]
    print(min(right, key=lambda r: r["median_s"])["impl"] if right else "blocked")


if __name__ == "__main__":
    main()
