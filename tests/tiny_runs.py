"""configs/tiny.py runs on a few dozen JSONL rows: seconds of data loading and evals."""

import json

from configs import tiny
from ftlib import trainer

WORDS = ["good", "bad", "fine", "awful", "great", "dull"]


def small_rt_jsonl(path, n=48):
    rows = [{"text": f"a {WORDS[i % 6]} film number {i}", "label": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_tiny(workdir, max_steps, method="lora", checkpoint=""):
    """train_and_evaluate in-process; the data file lies next to `workdir`."""
    c = tiny.get_config(method)
    c.max_steps = max_steps
    c.model.checkpoint = checkpoint
    c.data.source, c.data.path = "jsonl", str(small_rt_jsonl(workdir.parent / "rt.jsonl"))
    c.eval.every = c.checkpoint.every = max(max_steps, 1)
    trainer.train_and_evaluate(c, str(workdir))
    return workdir
