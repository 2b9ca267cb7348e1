"""Decode speed of ftlib.generate on SmolLM2-135M-Instruct, with and without the KV cache; writes JSON.

  python benchmarks/decode.py --out=benchmarks/decode.json
  python benchmarks/decode.py --batch_sizes=1,4 --new_tokens=32 --dtype=bfloat16
  python benchmarks/decode.py --variant=sliced_frozen_weights  # a paired_ab.py variant

Per batch size and mode: one call to compile, then `--repeats` timed calls of
greedy decoding of --new_tokens tokens (no stop token, so every row decodes
them all) from a chat-templated prompt. Reported: median seconds per call,
generated tokens/s (batch * new_tokens / seconds, prefill included) and
compile seconds (first call - median). Without the cache every token reruns the
whole padded sequence (prompt bucket + new tokens); with it, one token per step.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed

PROMPT = "Write a short story about a robot who learns to paint, in three sentences."


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="1,4")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--variant", default="ftlib", help="one of paired_ab.py's VARIANTS")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import jax
    import paired_ab

    # Entered for the whole process; held, since collecting it would undo its patches.
    variant = paired_ab.VARIANTS[args.variant]()
    variant.__enter__()

    from configs import default
    from ftlib import generate as gen
    from ftlib.models import build_model

    c = default.get_config()
    c.model.dtype = args.dtype
    model, tokenizer = build_model(c.model, 0)
    ids = gen.encode(tokenizer, PROMPT, chat=True)
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [ids] * batch
        for use_cache in (True, False):
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                out = gen.generate(model, prompts, args.new_tokens, use_cache=use_cache)
                times.append(time.perf_counter() - start)
            assert all(len(o) == args.new_tokens for o in out)
            median = statistics.median(times[1:])
            row = {
                "batch": batch,
                "cache": use_cache,
                "prompt_tokens": len(ids),
                "new_tokens": args.new_tokens,
                "seconds": round(median, 4),
                "tokens_per_s": round(batch * args.new_tokens / median, 1),
                "compile_s": round(times[0] - median, 2),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "model": c.model.checkpoint,
        "dtype": args.dtype,
        "variant": args.variant,
        "device": str(jax.devices()[0].device_kind),
        "load_avg_1m": round(os.getloadavg()[0], 1),  # other processes on the host skew CPU numbers
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
