"""The step-time benchmark's workloads are the ones the performance issue fixes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_time  # noqa: E402

# The performance issue's parameter counts: (total for full, LoRA r=8 on all 7 projections).
EXPECTED = {"llama-tiny": (7_358_720, 156_160), "llama-small": (58_073_600, 624_640)}


@pytest.mark.parametrize("workload", ["llama-tiny", "llama-small"])
def test_workload_parameter_counts(workload):
    total, lora = EXPECTED[workload]
    _, _, _, full_mask = step_time.train_setup(step_time.llama_config(workload), "full", 1)
    assert (full_mask.count(), full_mask.count(True)) == (total, total)
    _, _, _, lora_mask = step_time.train_setup(step_time.llama_config(workload), "lora", 1)
    assert (lora_mask.count(), lora_mask.count(True)) == (total + lora, lora)


def test_model_flops_counts_weight_gradients_only_for_trainable_matmuls():
    vocab, d, f, layers, _, batch, seq = step_time.WORKLOADS["llama-tiny"]
    tokens = batch * seq
    n = layers * (4 * d * d + 3 * d * f) + vocab * d  # matmul params; embeddings are lookups
    full = step_time.model_flops(vocab, d, f, layers, batch, seq, n)
    lora = step_time.model_flops(vocab, d, f, layers, batch, seq, 156_160)
    attention = full - 6 * n * tokens  # full fine-tuning: 6 N D plus attention's own matmuls
    assert 0 < attention < 0.2 * full
    # LoRA skips the weight gradients (2 FLOPs per weight per token) of frozen matmuls.
    assert full - lora == 2 * (n - 156_160) * tokens
