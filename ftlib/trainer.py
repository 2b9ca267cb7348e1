"""train_and_evaluate(config, workdir): the one training loop for every method.

Order of work: build model + tokenizer -> data -> PEFT surgery and mask -> mesh
and shardings -> resume from DIR/checkpoints if present -> zero-shot test eval
-> train with periodic val eval, early stopping and checkpoints -> test eval of
the best params -> summary table.
"""

from __future__ import annotations

import json
import math
import signal
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ftlib import adapters, compile_cache, data, peak_rss, peft, sharding
from ftlib.checkpoint import Checkpointer
from ftlib.metrics import MetricsLogger, read_metrics, run_dir, save_config
from ftlib.models import build_model
from ftlib.optim import make_optimizer
from ftlib.steps import init_train_state, make_eval_step, make_train_step


class _StopSignal:
    """SIGTERM (preemption, `kill`) asks the loop to checkpoint and exit."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self.previous)


class Evaluator:
    """Jitted evaluation of params on a split; returns host floats."""

    def __init__(self, task, graphdef, param_sh, frozen_sh, mesh, batch_size, objective):
        self.task, self.mesh, self.batch_size = task, mesh, batch_size
        self.objective = objective
        self.classification = task.choice_token_ids is not None
        self.step = jax.jit(
            make_eval_step(graphdef, task.choice_token_ids, objective),
            in_shardings=(param_sh, frozen_sh, sharding.batch_sharding(mesh)),
        )

    def __call__(self, params, frozen, split, max_examples=0) -> dict[str, float]:
        sums = []
        for batch in self.task.eval_batches(split, self.batch_size, max_examples):
            sums.append(self.step(params, frozen, sharding.put_batch(batch, self.mesh)))
        total = {k: float(sum(s[k] for s in jax.device_get(sums))) for k in sums[0]}
        n = max(total["tokens"], 1.0)
        loss = total["nll"] / n
        if self.objective == "sequence_classification":  # `tokens` counts rows here
            return {"loss": loss, "accuracy": total["correct"] / n, "examples": int(n)}
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.classification:  # label-word likelihood; token_accuracy over the whole vocab
            return {
                **metrics,
                "accuracy": total["correct"] / n,
                "token_accuracy": total["token_correct"] / n,
                "examples": int(total["tokens"]),
            }
        return {**metrics, "token_accuracy": total["correct"] / n, "tokens": int(total["tokens"])}


def _objective(data_cfg) -> str:
    """The loss the data asks for: an encoder's class head, or next-token prediction."""
    if data_cfg.format == "sequence_classification":
        return "sequence_classification"
    return "causal_lm"


def _max_targets(task, data_cfg) -> int:
    """Static bound on loss tokens per row for the LM head gather; 0 (all
    positions) when rows are packed, targets are most of the sequence, or there
    is no LM head (sequence classification)."""
    if data_cfg.pack or _objective(data_cfg) != "causal_lm":
        return 0
    most = max(int(e["loss_mask"].sum()) for e in task.examples["train"])
    return most if most <= data_cfg.seq_len // 4 else 0


class _TrainWindow:
    """Train metrics of the steps since the last log: one host sync per log
    interval, never per step (the device runs ahead of the Python loop)."""

    def __init__(self, logger):
        self.logger = logger
        # Seconds per step of each window but the first (it holds the compile).
        self.step_seconds, self._compiled = [], False
        self.restart()

    def restart(self):
        self.metrics, self.tokens, self.since = [], 0, time.time()

    def add(self, step_metrics, tokens: int):
        self.metrics.append(step_metrics)
        self.tokens += tokens

    def flush(self, step: int) -> dict:
        values = jax.device_get(self.metrics)
        names = [k for k in values[0] if k != "tokens"]  # the accuracy name follows the objective
        logged = {k: float(np.mean([v[k] for v in values])) for k in names}
        elapsed = max(time.time() - self.since, 1e-9)
        logged["tokens_per_s"] = self.tokens / elapsed
        if self._compiled:
            self.step_seconds.append(elapsed / len(values))
        self._compiled = True
        self.logger.write(step, "train", **logged)
        self.restart()
        return {"loss": f"{logged['loss']:.4f}", "tok_s": f"{logged['tokens_per_s']:.0f}"}


def _track_best(meta: dict, val: dict, step: int, eval_cfg, save_best) -> None:
    """Best-checkpoint and early-stopping bookkeeping in `meta` (checkpointed)."""
    value, best = val[eval_cfg.metric], meta["best"]
    if best is None or (value > best if eval_cfg.mode == "max" else value < best):
        meta.update(best=value, best_step=step, bad_evals=0)
        save_best()
        return
    meta["bad_evals"] += 1
    if eval_cfg.patience and meta["bad_evals"] >= eval_cfg.patience:
        meta["stopped"] = (
            f"early stop at step {step}: no val {eval_cfg.metric} gain in {meta['bad_evals']} evals"
        )


def _truncate_metrics(workdir, step: int):
    """On resume, drop records logged after the checkpoint and the final test
    record: the resumed run writes them again."""
    if jax.process_index() != 0:
        return
    records = [r for r in read_metrics(workdir) if r["step"] <= step and r.get("event") != "final"]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _save_adapter(path, params, peft_cfg, base: dict) -> None:
    if jax.process_count() > 1:  # every process takes part; process 0 writes
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        adapters.save_adapter(path, params, peft_cfg, base)


def train_and_evaluate(config, workdir: str) -> dict:
    start = time.time()
    peak_rss.reset()  # the summary's peak is this run's, not an earlier sweep run's
    workdir = run_dir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    compile_cache.enable(config.compilation_cache)
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules)

    objective = _objective(config.data)
    num_labels = len(config.data.label_words) if objective == "sequence_classification" else 0
    model, tokenizer = build_model(config.model, config.seed, num_labels)
    task = data.load_task(config.data, tokenizer)
    print(f"data: {task.stats}")
    peft.resolve_init_texts(config.peft, tokenizer)
    mask = peft.apply_method(model, config.peft, config.seed)
    if config.peft.init_adapter:
        kind = adapters.load_initial(model, config.peft.init_adapter, config.peft)
        print(f"initial adapter ({kind}): {config.peft.init_adapter}")
    print(mask.table())

    tx = make_optimizer(config.optim, config.max_steps)
    # Before frozen_dtype casts the base: an adapter names the base as loaded.
    base = adapters.base_fingerprint(nnx.split(model, mask.filter, ...)[2])
    graphdef, state, frozen = init_train_state(model, mask, tx, config.model.frozen_dtype)
    del model
    state_sh = sharding.tree_shardings(state, mesh, rules)
    frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
    print(f"mesh: {dict(mesh.shape)}\nparam shardings:\n{sharding.summary(state_sh.params)}")
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, config.seed, _max_targets(task, config.data), objective),
        donate_argnums=0,
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
    evaluate = Evaluator(
        task, graphdef, state_sh.params, frozen_sh, mesh, config.data.eval_batch_size, objective
    )

    ckpt = Checkpointer(workdir, config.checkpoint)
    train_iter = task.train_iterator(config.data.batch_size)
    meta = {"best": None, "best_step": 0, "bad_evals": 0, "zero_shot": None, "stopped": ""}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, data_state, meta = restored
        train_iter.set_state(data_state)
        _truncate_metrics(workdir, int(state.step))
        print(f"resumed from step {int(state.step)} in {workdir}")
    save_config(config, workdir)  # after the compatibility check: a refused run overwrites nothing
    logger = MetricsLogger(workdir)

    if config.eval.zero_shot and meta["zero_shot"] is None:
        meta["zero_shot"] = evaluate(state.params, frozen, "test")
        logger.write(0, "test", event="zero_shot", **meta["zero_shot"])

    step = int(state.step)
    window = _TrainWindow(logger)
    with (
        _StopSignal() as stop,
        tqdm(
            total=config.max_steps, initial=step, desc="train", disable=jax.process_index() != 0
        ) as bar,
    ):
        while step < config.max_steps and not meta["stopped"]:
            batch = next(train_iter)
            state, step_metrics = train_step(state, frozen, sharding.put_batch(batch, mesh))
            step += 1
            window.add(step_metrics, int((batch["segment_ids"] > 0).sum()))
            if step % config.log_every == 0 or step == config.max_steps:
                bar.set_postfix(window.flush(step))
            bar.update(1)
            if step % config.eval.every == 0 or step == config.max_steps:
                val = evaluate(state.params, frozen, "val", config.eval.max_examples)
                logger.write(step, "val", **val)
                _track_best(
                    meta,
                    val,
                    step,
                    config.eval,
                    lambda: ckpt.save_best(
                        step,
                        state.params,
                        {"step": step, config.eval.metric: val[config.eval.metric]},
                    ),
                )
                window.restart()  # eval time is not training throughput
            if step % config.checkpoint.every == 0 or stop.requested or meta["stopped"]:
                ckpt.save(step, state, train_iter.get_state(), meta, force=True)
            if stop.requested:
                ckpt.wait()
                ckpt.close()
                logger.close()
                raise SystemExit(f"SIGTERM: saved step {step} to {workdir}; rerun to resume")
    ckpt.save(step, state, train_iter.get_state(), meta, force=True)

    best = ckpt.restore_best(state.params)
    params, best_step = (best[0], best[1]["step"]) if best else (state.params, step)
    test = evaluate(params, frozen, "test")
    if mask.count(True) < mask.count():  # PEFT: the best params as a swappable adapter file
        _save_adapter(workdir / "adapter", params, config.peft, base)
    logger.write(best_step, "test", event="final", **test)
    ckpt.wait()
    checkpoint_bytes = ckpt.best_bytes()
    ckpt.close()
    logger.close()
    summary = {
        "zero_shot": meta["zero_shot"],
        "test": test,
        "best_step": best_step,
        "steps": step,
        "best_val": meta["best"],
        "stopped": meta["stopped"],
        "trainable_params": mask.count(True),
        "total_params": mask.count(),
        "wall_s": time.time() - start,
        "median_step_s": float(np.median(window.step_seconds)) if window.step_seconds else None,
        "peak_rss_mb": peak_rss.peak_mb(),  # this run's, even inside a sweep
        "checkpoint_bytes": checkpoint_bytes,  # trainable params only: the adapter's size
        "data": task.stats,
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_table(summary: dict) -> str:
    acc = "accuracy" if "accuracy" in summary["test"] else "token_accuracy"
    zs = summary["zero_shot"]
    rows = [
        (f"zero-shot test {acc}", f"{zs[acc]:.4f}" if zs else "n/a"),
        (f"fine-tuned test {acc}", f"{summary['test'][acc]:.4f}"),
        ("fine-tuned test loss", f"{summary['test']['loss']:.4f}"),
        (
            "trainable / total params",
            f"{summary['trainable_params']:,} / "
            f"{summary['total_params']:,} ({100 * summary['trainable_params'] / summary['total_params']:.2f}%)",
        ),
        ("steps (best)", f"{summary['steps']} ({summary['best_step']})"),
        ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
