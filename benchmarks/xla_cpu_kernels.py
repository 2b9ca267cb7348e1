"""The train step's products on the CPU by library, each in its own process: XLA with
YNNPACK, XLA with oneDNN fusions, ftlib's MKL custom call (its fp32 default on one CPU
device), numpy's BLAS and torch; and XLA's transpose against a copy. Two rows are not
fp32 products: `mkl-bf16` (MKL's bf16 x bf16 -> fp32 product, on AMX where the CPU has
it) and `mkl-bf16x3` (each fp32 operand split into bf16 halves, x ~= hi + lo, and
hi*hi + hi*lo + lo*hi as one bf16 product over a 3x longer contraction: about 16 of
fp32's 24 mantissa bits, as JAX's `Precision.HIGH` on TPUs). Their operands are
converted (and b^T laid out as [K, N]) before timing: the splits' passes over memory
are not in their times.

  python benchmarks/xla_cpu_kernels.py --processes=2 --out results/xla_cpu_kernels.json

Why: a comparison of product libraries in one process is wrong on this kind of machine.
BLAS and OpenMP worker threads spin after each call, and on two cores they take the
other library's time: interleaved with numpy's OpenBLAS, XLA's products measured 87-125
GFLOP/s, against 181-235 in a process of their own. So each library runs alone in a
child process (`--library`), the children alternate (ABCD, DCBA, ...), and each case
reports the median over processes. jaxlib's XLA carries a oneDNN runtime
(`xla_cpu_use_onednn` with `xla_cpu_experimental_onednn_fusion_type`). The shapes are
llama-small's (batch 4 x seq 512, hidden 512, MLP 1376, vocab 32000): projections
forward and backward, the fused LM head's 256-row blocks, and one attention block.
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np

ONEDNN = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "",
}
LIBRARIES = ("ynnpack", "onednn", "mkl", "numpy", "torch", "mkl-bf16", "mkl-bf16x3")
# name -> (lhs shape, rhs shape, transpose rhs (g @ W^T), FLOPs); the last is batched.
CASES = {
    "x[2048,512] @ W[512,1376] (gate, up)": ((2048, 512), (512, 1376), False),
    "x[2048,1376] @ W[1376,512] (down)": ((2048, 1376), (1376, 512), False),
    "g[2048,1376] @ W[512,1376]^T (dx)": ((2048, 1376), (512, 1376), True),
    "x^T[512,2048] @ g[2048,1376] (dW)": ((512, 2048), (2048, 1376), False),
    "h[256,512] @ W[512,32000] (head block)": ((256, 512), (512, 32000), False),
    "g[256,32000] @ W[512,32000]^T (head dh)": ((256, 32000), (512, 32000), True),
    "h^T[512,256] @ g[256,32000] (head dW)": ((512, 256), (256, 32000), False),
    "q[4,8,128,64] k[4,8,512,64]^T (scores)": ((4, 8, 128, 64), (4, 8, 512, 64), True),
}


def _flops(lhs, rhs, transpose_rhs) -> int:
    n = rhs[-2] if transpose_rhs else rhs[-1]
    return 2 * int(np.prod(lhs)) * n


def _product(library: str, transpose_rhs: bool):
    """-> f(a, b) = a @ b (or a @ b^T over the last two dims) in `library`."""
    if library in ("ynnpack", "onednn"):
        import jax
        import jax.numpy as jnp

        def f(a, b):
            return jnp.matmul(a, jnp.swapaxes(b, -1, -2) if transpose_rhs else b)

        def compiled(a, b):
            a, b = jnp.asarray(a), jnp.asarray(b)
            lowered = jax.jit(f).lower(a, b)
            run = lowered.compile(ONEDNN if library == "onednn" else None)
            return lambda: run(a, b).block_until_ready()

        return compiled
    if library == "mkl":  # ftlib's products: sequential MKL on XLA's pool (ftlib.mkl_gemm)
        import jax
        import jax.numpy as jnp

        from ftlib import mkl_gemm

        def compiled(a, b):
            a, b = jnp.asarray(a), jnp.asarray(b)
            run = jax.jit(lambda a, b: mkl_gemm.gemm(a, b, transpose_b=transpose_rhs))
            return lambda: run(a, b).block_until_ready()

        return compiled
    if library.startswith("mkl-bf16"):
        return lambda a, b: _mkl_bf16(a, b, transpose_rhs, split=library == "mkl-bf16x3")
    if library == "torch":
        import torch

        torch.set_num_threads(2)

        def compiled(a, b):
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            b = b.transpose(-1, -2) if transpose_rhs else b  # a view: BLAS's own flag
            return lambda: torch.matmul(a, b)

        return compiled

    def compiled(a, b):
        b = np.swapaxes(b, -1, -2) if transpose_rhs else b
        return lambda: np.matmul(a, b)

    return compiled


def _mkl_bf16(a, b, transpose_rhs: bool, split: bool):
    """-> f() = a @ b (b^T) as MKL's bf16 product into fp32, MKL on its own 2 threads;
    with split, the bf16x3 sum over a [a_hi a_hi a_lo] @ [b_hi; b_lo; b_hi] product."""
    import ctypes
    import os

    import ml_dtypes

    from ftlib import mkl_gemm

    mkl = ctypes.CDLL(str(mkl_gemm._mkl_rt()), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    mkl.MKL_Set_Num_Threads(2)
    gemm = mkl.cblas_gemm_bf16bf16f32
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    gemm.argtypes = [i32] * 6 + [ctypes.c_float, ptr, i32, ptr, i32, ctypes.c_float, ptr, i32]

    def halves(x):
        hi = x.astype(ml_dtypes.bfloat16)
        return hi, (x - hi.astype(np.float32)).astype(ml_dtypes.bfloat16)

    b = np.swapaxes(b, -1, -2) if transpose_rhs else b  # [..., K, N]
    if split:
        (a_hi, a_lo), (b_hi, b_lo) = halves(a), halves(b)
        a, b = np.concatenate([a_hi, a_hi, a_lo], -1), np.concatenate([b_hi, b_lo, b_hi], -2)
    else:
        a, b = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    a = np.ascontiguousarray(a).reshape(-1, *a.shape[-2:])
    b = np.ascontiguousarray(b).reshape(-1, *b.shape[-2:])
    (m, k), n = a.shape[-2:], b.shape[-1]
    c = np.empty((a.shape[0], m, n), np.float32)
    row_major, no_trans = 101, 111

    def run():
        for i in range(a.shape[0]):
            gemm(
                row_major,
                no_trans,
                no_trans,
                m,
                n,
                k,
                1.0,
                a[i].ctypes.data,
                k,
                b[i].ctypes.data,
                n,
                0.0,
                c[i].ctypes.data,
                n,
            )
        return c

    return run


def _median_s(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(library: str, rounds: int) -> dict:
    """This process's median seconds per case for one library, and for XLA the
    transpose and copy of a [2048, 1376] slice of a layer stack."""
    rng = np.random.default_rng(0)
    out = {}
    for case, (lhs, rhs, transpose_rhs) in CASES.items():
        a, b = (rng.standard_normal(s, dtype=np.float32) for s in (lhs, rhs))
        out[case] = _median_s(_product(library, transpose_rhs)(a, b), rounds)
    if library == "ynnpack":
        import jax
        import jax.numpy as jnp

        stack = jnp.asarray(rng.standard_normal((8, 2048, 1376), dtype=np.float32))
        layer = lambda s: jax.lax.dynamic_index_in_dim(s, 3, keepdims=False)  # noqa: E731
        for name, fn in (("transpose", lambda s: layer(s).T), ("copy", lambda s: layer(s) * 2)):
            run = jax.jit(fn).lower(stack).compile()
            out[f"[2048,1376] {name}"] = _median_s(lambda: run(stack).block_until_ready(), rounds)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=LIBRARIES, help="measure one, print JSON")
    parser.add_argument("--processes", type=int, default=2, help="child processes per library")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.library:
        print(json.dumps(measure(args.library, args.rounds)))
        return
    runs = {lib: [] for lib in LIBRARIES}
    for p in range(args.processes):
        for lib in LIBRARIES if p % 2 == 0 else LIBRARIES[::-1]:
            cmd = [sys.executable, __file__, f"--library={lib}", f"--rounds={args.rounds}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:  # torch is an optional extra
                print(f"{lib}: failed ({done.stderr.strip().splitlines()[-1:]})")
                continue
            runs[lib].append(json.loads(done.stdout.strip().splitlines()[-1]))
    records = []
    for lib, per_process in runs.items():
        for case in per_process[0] if per_process else ():
            seconds = float(np.median([r[case] for r in per_process]))
            record = {"library": lib, "case": case, "median_s": seconds}
            if case in CASES:
                record["gflops_per_s"] = _flops(*CASES[case]) / seconds / 1e9
            else:  # read + write of the slice
                record["gb_per_s"] = 2 * 2048 * 1376 * 4 / seconds / 1e9
            records.append(record)
    for case in [*CASES, "[2048,1376] transpose", "[2048,1376] copy"]:
        rows = [r for r in records if r["case"] == case]
        unit = "GFLOP/s" if case in CASES else "GB/s"
        rates = "  ".join(
            f"{r['library']} {r.get('gflops_per_s', r.get('gb_per_s')):.0f}" for r in rows
        )
        print(f"{case:42s} {rates} {unit}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
