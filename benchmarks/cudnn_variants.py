"""cuDNN's fused attention at llama-1b's shape (B 8, T 2048, 32 query heads, 4 KV
heads, head 64, bf16), four ways, on a GPU: the library's call on unpacked rows (GQA,
causal + sequence lengths: the unpacked branch of `attention._cudnn`), causal alone, and both with K/V repeated to 32 heads (MHA); jitted forward
alone and value-and-grad, medians of 30 synchronised calls, and each output's relative
L2 error against XLA's attention on the same inputs. Writes JSON.

  python benchmarks/cudnn_variants.py --out=/tmp/cudnn_variants.json
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from attention_kernels import median_s, value_and_grads

B, T, N, K, H = 8, 2048, 32, 4, 64


def _cudnn(q, k, v, lengths=None):
    extra = (
        {} if lengths is None else dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    )
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn", **extra)


def _mha(fn):
    """fn with K/V repeated per query head (their gradients summed back by autodiff)."""
    return lambda q, k, v: fn(q, jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    q, g = (jax.random.normal(k, (B, T, N, H), jnp.bfloat16) for k in (keys[0], keys[3]))
    k, v = (jax.random.normal(k, (B, T, K, H), jnp.bfloat16) for k in keys[1:3])
    lengths = jnp.full((B,), T, jnp.int32)
    with_lengths = lambda q, k, v: _cudnn(q, k, v, lengths)
    variants = {
        "gqa_lengths (the library's)": with_lengths,
        "gqa_causal": _cudnn,
        "mha_lengths": _mha(with_lengths),
        "mha_causal": _mha(_cudnn),
    }
    xla = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"
    )
    want = value_and_grads(xla, g)(q, k, v)
    records = {}
    for name, fn in variants.items():
        fwd_bwd = value_and_grads(fn, g)
        got = fwd_bwd(q, k, v)
        f32 = lambda x: x.astype(jnp.float32)
        records[name] = {
            "fwd_bwd_ms": median_s(fwd_bwd, (q, k, v), 30) * 1e3,
            "fwd_ms": median_s(jax.jit(fn), (q, k, v), 30) * 1e3,
            "rel_err_out_dq_dk_dv": [
                float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))
                for a, b in zip(got, want)
            ],
        }
        print(name, json.dumps(records[name]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
