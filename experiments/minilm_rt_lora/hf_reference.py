"""HF transformers + peft reference for configs/minilm_rt_lora.py, on ftlib's own data split.

Same examples as ftlib trains on (`ftlib.data.load_task` with the config's data section:
"[CLS] snippet [SEP]", at most 64 tokens, ftlib's hash split), but the model and training
loop are plain HF: `BertForSequenceClassification` (tanh pooler on [CLS], as HF does) with
PEFT's `LoraConfig(task_type=SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"])`
(PEFT's default lora_dropout, 0.0), trained like HF Trainer's defaults: AdamW lr 5e-4,
weight decay 0, linear decay to 0 over 2 epochs, no warmup, batch 32 shuffled, dynamic
padding, BERT dropout 0.1, grad clip 1.0. Val and test accuracy after each epoch.

  python experiments/minilm_rt_lora/hf_reference.py --out=experiments/minilm_rt_lora/hf_reference.json
"""

import argparse
import json
import math
import os
import sys
import time

import peft
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import ftlib.assets  # noqa: E402
import ftlib.data  # noqa: E402
import ftlib.hf  # noqa: E402
from configs import minilm_rt_lora  # noqa: E402


def batches(examples, batch_size, pad_id, order=None):
    """Dynamically padded (input_ids, attention_mask, labels) tensors, in `order` if given."""
    order = range(len(examples)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[j, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
            mask[j, :n] = 1
        labels = torch.as_tensor([int(r["label"]) for r in rows], dtype=torch.long)
        yield ids, mask, labels


@torch.no_grad()
def accuracy(model, examples, pad_id):
    model.eval()
    correct = 0
    for ids, mask, labels in batches(examples, 64, pad_id):
        logits = model(input_ids=ids, attention_mask=mask).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(examples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/minilm_rt_lora/hf_reference.json")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--split_seed", type=int, default=0, help="ftlib's data.split_seed (0: the config's)"
    )
    args = parser.parse_args()

    c = minilm_rt_lora.get_config()
    c.data.split_seed = args.split_seed
    tokenizer = ftlib.hf.load_pretrained(c.model.checkpoint, weights=False).tokenizer
    task = ftlib.data.load_task(c.data, tokenizer)
    train, val, test = (task.examples[s] for s in ("train", "val", "test"))
    pad_id = tokenizer.pad_token_id
    print(f"split: train {len(train)}, val {len(val)}, test {len(test)}", flush=True)

    torch.manual_seed(0)
    folder = ftlib.assets.asset_path(c.model.checkpoint)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    lora = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]
    )
    model = peft.get_peft_model(model, lora)
    model.print_trainable_parameters()
    model.train()

    batch_size = c.data.batch_size
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total))

    result = {
        "settings": {
            "lora": "r=8 alpha=16 dropout=0.0 query,value; classifier trained, pooler frozen",
            "optimizer": "AdamW lr 5e-4 wd 0, linear to 0, no warmup, clip 1.0",
            "batch_size": batch_size,
            "epochs": args.epochs,
            "steps": total,
            "seed": 0,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "threads": torch.get_num_threads(),
        },
        "split": {
            "split_seed": args.split_seed,
            "train": len(train),
            "val": len(val),
            "test": len(test),
        },
        "epochs": [],
    }
    step = 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train)).tolist()
        start, loss_sum = time.time(), 0.0
        for ids, mask, labels in batches(train, batch_size, pad_id, order):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            loss_sum += loss.item()
            step += 1
            if step % 25 == 0:
                per_step = (time.time() - start) / (step - (epoch - 1) * steps_per_epoch)
                print(
                    f"step {step}/{total} loss {loss.item():.4f} {per_step:.2f} s/step "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        train_s = time.time() - start
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / steps_per_epoch,
            "s_per_step": train_s / steps_per_epoch,
            "val_acc": accuracy(model, val, pad_id),
            "test_acc": accuracy(model, test, pad_id),
            "loadavg": os.getloadavg(),
        }
        result["epochs"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
