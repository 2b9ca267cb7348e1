"""Evaluation time of the default run's model on its test split, by batch layout.

  python benchmarks/eval_time.py --rows=16,32 --rounds=2 --out=results/eval_time.json

SmolLM2-135M-Instruct with configs/default.py's LoRA (adapters at init) scores the
1,091 test snippets with the jitted eval step the trainer uses, in two layouts:
`packed` (ftlib's: examples packed into rows of the longest example, rounded up,
`data.pipeline.eval_batches`) and `sorted` (one example per row, sorted by length, each
batch padded to a multiple of data.pad_to_multiple: the layout before session 30),
alternating within each round, for each rows-per-batch. Every batch shape is compiled
before the timed pass. Each record holds the seconds, padded and real tokens, tokens/s
and the accuracy and loss, which must agree between layouts.
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def sorted_batches(task, rows: int) -> list[dict]:
    """One example per row, in the eval step's per-row example slots (one each)."""
    from ftlib.data import pipeline

    batches = []
    for b in pipeline.eval_batches(
        task.examples["test"],
        rows,
        pad_id=task.pad_id,
        seq_len=task.seq_len,
        pad_to_multiple=task.pad_to_multiple,
    ):
        b["choice_pos"], b["label"] = b["choice_pos"][:, None], b["label"][:, None]
        b["example_weight"] = b["weight"][:, None]
        batches.append(b)
    return batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,32", help="rows per batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import jax
    import optax

    from configs import default
    from ftlib import data, peft
    from ftlib.models import build_model
    from ftlib.steps import init_train_state, make_eval_step

    cfg = default.get_config()
    model, tokenizer = build_model(cfg.model, cfg.seed)
    task = data.load_task(cfg.data, tokenizer)
    mask = peft.apply_method(model, cfg.peft, cfg.seed)
    graphdef, state, frozen = init_train_state(model, mask, optax.sgd(0.0))
    step = jax.jit(make_eval_step(graphdef, task.choice_token_ids, "causal_lm"))
    layouts = {
        "packed": lambda rows: list(task.eval_batches("test", rows)),
        "sorted": lambda rows: sorted_batches(task, rows),
    }
    records = []
    for rnd in range(args.rounds):
        for rows in [int(r) for r in args.rows.split(",")]:
            for layout, make in layouts.items():
                batches = make(rows)
                for shape in {b["input_ids"].shape: b for b in batches}.values():
                    jax.block_until_ready(step(state.params, frozen, shape))  # compile
                start = time.perf_counter()
                sums = jax.device_get([step(state.params, frozen, b) for b in batches])
                seconds = time.perf_counter() - start
                total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
                tokens = sum(b["input_ids"].size for b in batches)
                real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
                rec = {
                    "round": rnd,
                    "layout": layout,
                    "rows": rows,
                    "batches": len(batches),
                    "shapes": sorted({b["input_ids"].shape[1] for b in batches}),
                    "seconds": seconds,
                    "tokens": tokens,
                    "real_tokens": real,
                    "tokens_per_s": tokens / seconds,
                    "real_tokens_per_s": real / seconds,
                    "accuracy": total["correct"] / total["tokens"],
                    "loss": total["nll"] / total["tokens"],
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
