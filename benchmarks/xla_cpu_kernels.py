"""XLA:CPU's kernels on the train step's shapes: each product compiled with YNNPACK
(XLA's default) and with oneDNN fusions, and a transpose against a copy.

  python benchmarks/xla_cpu_kernels.py --out results/xla_cpu_kernels.json

Why: on a machine where the step is GEMM-bound, the library that runs the products
sets the floor. jaxlib's XLA carries a oneDNN runtime (`xla_cpu_use_onednn` with
`xla_cpu_experimental_onednn_fusion_type`); this measures it alone, one op per
jitted call, alternating the variants so slow spells hit both. The shapes are
llama-small's (batch 4 x seq 512, hidden 512, MLP 1376, vocab 32000): projections
forward and backward, the fused LM head's 256-row blocks, and one attention block.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

ONEDNN = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "",
}
_NT = (((1,), (1,)), ((), ()))  # contract both operands' last dim: g @ W^T


def _nt(a, b):
    return jax.lax.dot_general(a, b, _NT)


def _attention_scores(q, k):
    return jnp.einsum("bkrh,bksh->bkrs", q, k)


# name -> (function, lhs shape, rhs shape, FLOPs)
CASES = {
    "x[2048,512] @ W[512,1376] (gate, up)": (
        jnp.dot,
        (2048, 512),
        (512, 1376),
        2 * 2048 * 512 * 1376,
    ),
    "x[2048,1376] @ W[1376,512] (down)": (
        jnp.dot,
        (2048, 1376),
        (1376, 512),
        2 * 2048 * 1376 * 512,
    ),
    "g[2048,1376] @ W[512,1376]^T (dx)": (_nt, (2048, 1376), (512, 1376), 2 * 2048 * 1376 * 512),
    "x^T[512,2048] @ g[2048,1376] (dW)": (
        jnp.dot,
        (512, 2048),
        (2048, 1376),
        2 * 512 * 2048 * 1376,
    ),
    "h[256,512] @ W[512,32000] (head block)": (
        jnp.dot,
        (256, 512),
        (512, 32000),
        2 * 256 * 512 * 32000,
    ),
    "g[256,32000] @ W[512,32000]^T (head dh)": (
        _nt,
        (256, 32000),
        (512, 32000),
        2 * 256 * 32000 * 512,
    ),
    "h^T[512,256] @ g[256,32000] (head dW)": (
        jnp.dot,
        (512, 256),
        (256, 32000),
        2 * 512 * 256 * 32000,
    ),
    "q[4,8,128,64] k[4,8,512,64] (scores)": (
        _attention_scores,
        (4, 8, 128, 64),
        (4, 8, 512, 64),
        2 * 4 * 8 * 128 * 512 * 64,
    ),
}


def _time(compiled: dict, args, rounds: int) -> dict:
    times = {name: [] for name in compiled}
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    records = []
    for case, (fn, lhs, rhs, flops) in CASES.items():
        a, b = (jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in (lhs, rhs))
        lowered = jax.jit(fn).lower(a, b)
        compiled = {"ynnpack": lowered.compile(), "onednn": lowered.compile(ONEDNN)}
        for name, seconds in _time(compiled, (a, b), args.rounds).items():
            records.append(
                {
                    "case": case,
                    "library": name,
                    "median_s": seconds,
                    "gflops_per_s": flops / seconds / 1e9,
                }
            )
        print(case, {r["library"]: round(r["gflops_per_s"]) for r in records[-2:]}, "GFLOP/s")
    # XLA's transpose against a copy of the same bytes: the explicit transposes that
    # layers.matmul's backward makes for dW (activations read from the scan's stack).
    stack = jnp.asarray(rng.standard_normal((8, 2048, 1376), dtype=np.float32))
    moves = {
        "transpose": jax.jit(lambda s, i: jax.lax.dynamic_index_in_dim(s, i, keepdims=False).T),
        "copy": jax.jit(lambda s, i: jax.lax.dynamic_index_in_dim(s, i, keepdims=False) * 2),
    }
    for name, seconds in _time(moves, (stack, jnp.int32(3)), args.rounds).items():
        gb = 2 * 2048 * 1376 * 4 / 1e9  # read + write
        records.append(
            {"case": f"[2048,1376] {name}", "median_s": seconds, "gb_per_s": gb / seconds}
        )
        print(f"[2048,1376] {name}: {seconds * 1e3:.2f} ms ({gb / seconds:.1f} GB/s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
