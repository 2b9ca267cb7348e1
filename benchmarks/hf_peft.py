"""The HF transformers + peft side of the step-time benchmark (step_time.py --vs=hf,
vs_hf_paired.py): the same Llama workloads, LoRA config, AdamW and batches as ftlib's.

PyTorch on CUDA when there is a GPU, else the CPU; --dtype=bfloat16 is torch.autocast.
"""

import time

from step_time import (
    LORA_TARGETS,
    TIMED,
    WARMUP,
    WORKLOADS,
    Workload,
    gpu_fields,
    make_record,
    model_flops,
    token_ids,
)


def setup(workload: str, mode: str, dtype: str):
    """HF transformers (PyTorch; CUDA when there is a GPU) + peft, as the benchmark
    runs it -> (step(ids_BT): one synchronised AdamW step on a numpy batch, model,
    trainable params, device)."""
    import contextlib

    import torch
    import transformers

    w = WORKLOADS[workload]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        initializer_range=0.02,
    )
    with device:  # initialised where it trains: a 1B init on the CPU takes a minute
        model = transformers.LlamaForCausalLM(cfg)
    if mode == "lora":
        import peft

        lora = peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        model = peft.get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    bf16 = dtype == "bfloat16"

    def step(ids_BT):
        x = torch.from_numpy(ids_BT).to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        loss.item()

    return step, model, trainable, device


def run(workload: str, mode: str, dtype: str) -> dict:
    """The benchmark's steps in HF transformers + peft -> step_time's JSON record."""
    import torch

    w = WORKLOADS[workload]
    step, model, trainable, device = setup(workload, mode, dtype)
    times = []
    for ids_BT in token_ids(workload, WARMUP + TIMED):
        start = time.perf_counter()
        step(ids_BT)
        times.append(time.perf_counter() - start)
    total = sum(p.numel() for p in model.parameters())
    # The embedding's gradient is a scatter, not a matmul; lm_head's is a matmul.
    trainable_matmul = sum(p.numel() for p in trainable if p.dim() == 2) - (
        w.vocab * w.hidden if mode == "full" else 0
    )
    flops = model_flops(w, trainable_matmul)
    trainable_count = sum(p.numel() for p in trainable)
    bf16 = dtype == "bfloat16"
    gemm_peak = _gemm_peak(w, torch.bfloat16 if bf16 else torch.float32, device)
    record = make_record("hf-peft", workload, mode, times, total, trainable_count, flops, gemm_peak)
    record.update(dtype=dtype, torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        record.update(gpu_fields(torch.cuda.get_device_name(), dtype, record, peak_mb))
    return record


def _gemm_peak(w: Workload, dtype, device) -> float:
    import numpy as np
    import torch

    big = max([(w.hidden, w.intermediate), (w.hidden, w.vocab)], key=lambda s: s[0] * s[1])
    x = torch.randn(w.batch * w.seq, big[0], dtype=dtype, device=device)
    y = torch.randn(big, dtype=dtype, device=device)
    (x @ y).sum().item()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        (x @ y)[0, 0].item()  # synchronises on a GPU
        times.append(time.perf_counter() - start)
    return 2 * w.batch * w.seq * big[0] * big[1] / float(np.median(times)) / 1e9
