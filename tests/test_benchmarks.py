"""The step-time benchmark's workloads are the ones the performance issue fixes; the
paired A/B's variants patch the step's build and undo it."""

import json
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
    w = step_time.WORKLOADS["llama-tiny"]
    d, tokens = w.hidden, w.batch * w.seq
    # matmul params; embeddings are lookups
    n = w.layers * (4 * d * d + 3 * d * w.intermediate) + w.vocab * d
    full = step_time.model_flops(w, n)
    lora = step_time.model_flops(w, 156_160)
    attention = full - 6 * n * tokens  # full fine-tuning: 6 N D plus attention's own matmuls
    assert 0 < attention < 0.2 * full
    # LoRA skips the weight gradients (2 FLOPs per weight per token) of frozen matmuls.
    assert full - lora == 2 * (n - 156_160) * tokens


def test_paired_ab_variants_change_the_build_and_restore_it():
    import paired_ab

    from ftlib import linear_cross_entropy, optim, steps
    from ftlib.models import attention, layer_stack, layers, llama, products
    from ftlib.models.llama import Llama
    from ftlib.peft import lora

    # Variants must not leak into later tests.
    plain, norm, swiglu = Llama.output_projection, layers.rms_norm, llama.swiglu
    with paired_ab.VARIANTS["plain_head"]():
        assert Llama.output_projection(object()) is None
    with paired_ab.VARIANTS["one_query_block"]():
        assert attention.query_blocks(256) == 1
    with paired_ab.VARIANTS["layer_loop"]():
        assert step_time.llama_config("llama-tiny").scan_layers is False
    with paired_ab.VARIANTS["layer_scan"]():
        assert step_time.llama_config("llama-1b", "bfloat16").scan_layers is True
    with paired_ab.VARIANTS["autodiff_norm_mlp"]():
        assert layers.rms_norm is not norm and llama.swiglu is not swiglu
    assert layers.rms_norm is norm and llama.swiglu is swiglu
    from jax._src.lax.control_flow import loops

    patched = {
        "uninitialized_scan_stacks": (loops, "_empty_array"),
        "indexed_layers": (layer_stack, "layer_slices"),
        "first_layer_input_grad": (layer_stack, "input_differentiated"),
        "sliced_frozen_weights": (layer_stack, "viewed"),
        "layer_scan_sliced_frozen_weights": (layer_stack, "viewed"),
        "down_saves_h": (products, "swiglu_product_applies"),
        "separate_projections": (products, "shared_input_applies"),
        "frozen_bf16": (steps, "init_train_state"),
        "fused_grads": (steps, "materialized"),
        "lora_two_products": (lora, "adapter_accumulated"),
        "adapter_in_product_all": (lora, "adapter_in_base_product"),
        "recompute_probs": (attention, "_causal"),
        "head_rows_512": (linear_cross_entropy, "block_rows"),
        "dw_contract_tokens": (layers, "matmul"),
        "xla_softmax_xent": (linear_cross_entropy, "softmax_xent"),
        "xla_swiglu_backward": (layers, "swiglu_backward"),
        "xla_rms_norm": (layers, "rms_norm_kernel"),
        "xla_adamw": (optim, "fused_adamw"),
        "xla_attention_softmax": (attention, "masked_softmax"),
        "attention_ops": (attention, "attention_kernel"),
        "rope_xla": (llama, "apply_rope"),
        "layer_loop_rope_xla": (llama, "apply_rope"),
    }
    for name, (owner, attr) in patched.items():
        before = getattr(owner, attr)
        with paired_ab.VARIANTS[name]():
            assert getattr(owner, attr) is not before, name
        assert getattr(owner, attr) is before, name
    assert (
        attention.query_blocks(256) == 2
        and step_time.llama_config("llama-tiny").scan_layers is None
    )
    assert Llama.output_projection is plain


def test_rounds_alternate_the_stacks_and_report_the_median_ratio(tmp_path, monkeypatch, capsys):
    calls = []

    hf_step_s = iter([2.0, 4.0, 1.0])  # ftlib's step takes 1 s in every round

    def fake_run(stack, workload, mode, dtype, attention):
        calls.append(stack)
        step_s = 1.0 if stack == "ftlib" else next(hf_step_s)
        return {"median_step_s": step_s, "gemm_bound_step_s": 0.5}

    monkeypatch.setattr(step_time, "_run_in_subprocess", fake_run)
    monkeypatch.setattr(step_time, "_print", lambda record: None)
    out = tmp_path / "records.json"
    argv = ["step_time.py", "--vs=hf", "--workloads=llama-tiny", "--modes=lora", "--rounds=3"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--out={out}"])
    step_time.main()
    assert calls == ["ftlib", "hf-peft", "hf-peft", "ftlib", "ftlib", "hf-peft"]
    assert "over 3 rounds: 0.50 (min 0.25, max 1.00)" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["round"] for r in records] == [0, 0, 1, 1, 2, 2]


def test_vs_hf_paired_alternates_steps_in_one_process(tmp_path, monkeypatch):
    """Both stacks' steps alternate round by round (order swapped every other round);
    the reported ratio is the median of per-round ftlib / HF times, warm-up excluded."""
    import types

    import hf_peft
    import vs_hf_paired

    from ftlib import malloc_env

    clock, calls = [0.0], []
    hf_s = iter([9.0] * step_time.WARMUP + [2.0, 4.0, 1.0])  # ftlib: 1 s in every round

    def ftlib_step(state, frozen, batch):
        calls.append(("ftlib", batch))
        clock[0] += 1.0
        return state, {"loss": types.SimpleNamespace(block_until_ready=lambda: None)}

    def hf_step(ids):
        calls.append(("hf", ids))
        clock[0] += next(hf_s)

    monkeypatch.setattr(malloc_env, "restart", lambda: None)
    monkeypatch.setattr(step_time, "llama_config", lambda workload: None)
    monkeypatch.setattr(step_time, "train_setup", lambda cfg, mode, n: (ftlib_step, 0, 0, 0))
    monkeypatch.setattr(hf_peft, "setup", lambda *a: (hf_step, None, None, None))
    monkeypatch.setattr(step_time, "batches", lambda workload, n: list(range(n)))
    monkeypatch.setattr(step_time, "token_ids", lambda workload, n: list(range(n)))
    monkeypatch.setattr(vs_hf_paired.time, "perf_counter", lambda: clock[0])
    out = tmp_path / "paired.json"
    monkeypatch.setattr(sys, "argv", ["vs_hf_paired.py", "--rounds=3", f"--out={out}"])
    vs_hf_paired.main()
    n = step_time.WARMUP + 3
    expected = []
    for i in range(n):
        expected += [("ftlib", i), ("hf", i)][:: -1 if i % 2 else 1]
    assert calls == expected
    record = json.loads(out.read_text())
    assert record["paired_ratio_median"] == 0.5  # rounds 1/2, 1/4, 1/1
    assert record["hf_median_step_s"] == 2.0 and record["ftlib_median_step_s"] == 1.0


def test_llama_1b_is_tinyllama_shaped():
    """The GPU workload: TinyLlama-1.1B's parameter count (HF's count in the H200 run),
    and GQA's smaller k/v projections in the FLOP count."""
    cfg = step_time.llama_config("llama-1b", "bfloat16")
    assert cfg.param_count() == 1_100_048_384 and cfg.num_kv_heads == 4
    w = step_time.WORKLOADS["llama-1b"]
    mha = step_time.model_flops(w._replace(kv_heads=w.heads), 0)
    kv_saved = 2 * w.hidden * (w.hidden - w.hidden // w.heads * w.kv_heads) * w.layers
    assert mha - step_time.model_flops(w, 0) == 4 * kv_saved * w.batch * w.seq


def test_profile_kinds_from_gpu_hlo():
    """profile_step.py sorts a GPU step's ops into phase and kind from the optimized
    HLO (lines trimmed from the H200 llama-1b run), and by name for ops it lacks."""
    import profile_step

    bwd = 'metadata={op_name="jit(train_step)/transpose(jvp())/while/body/dot_general"}'
    hlo = f"""
  %custom-call.4 = (bf16[5632,2048]{{1,0}}, s8[33554432]{{0}}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", {bwd}
  %dot_product_attention_fwd.4 = (bf16[8,32,2048,64]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={{op_name="jit(train_step)/jvp()/dot_product_attention"}}
  %gemm_fusion_dot_general.1 = bf16[2048,2048]{{1,0}} fusion(%a, %b), kind=kCustom, calls=%c, {bwd}
  ROOT %input_add_reduce_fusion = f32[16384]{{0}} fusion(%x), kind=kInput, calls=%r
  %loop_broadcast_fusion.18 = (bf16[22,8,2048,5632]{{3,2,1,0}}) fusion(), kind=kLoop, calls=%f
"""
    table = profile_step.op_table(hlo)
    assert table == {
        "custom-call.4": ("bwd", "gemm"),
        "dot_product_attention_fwd.4": ("fwd", "attention"),
        "gemm_fusion_dot_general.1": ("bwd", "gemm"),
        "input_add_reduce_fusion": ("fwd", "reduction fusion"),
        "loop_broadcast_fusion.18": ("fwd", "elementwise fusion"),
    }
    by_name = profile_step.phase_kind(table, "loop_dynamic_update_slice_fusion.46")
    assert by_name == ("?", "dynamic slice/update")
    assert profile_step.phase_kind(table, "loop_add_fusion.3") == ("?", "elementwise fusion")


def test_attention_recompute_matches_the_saved_probabilities_path():
    """paired_ab's `recompute_probs` experiment gives `_causal`'s outputs and gradients
    (GQA, a padding mask on top of the causal one, 4 query blocks)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from attention_recompute import causal

    from ftlib.models import attention

    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 32, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    lengths = np.array([T, 20])
    mask = np.tril(np.ones((T, T), bool))[None] & (np.arange(T) < lengths[:, None])[:, None]
    g = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    out_ref, vjp_ref = jax.vjp(lambda *a: attention._causal(4, *a, jnp.asarray(mask)), q, k, v)
    out, vjp = jax.vjp(lambda *a: causal(4, *a, jnp.asarray(mask)), q, k, v)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_block_cache_ab_alternates_the_switch_and_checks_the_preload(monkeypatch, tmp_path):
    """Each round runs the cache on and off (order swapped every other round) through
    FTLIB_BLOCK_CACHE, and a process whose preload does not match its switch stops the
    comparison instead of reporting a void ratio."""
    import subprocess
    import types

    import block_cache_ab

    runs = []

    def fake_run(cmd, capture_output, text, env):
        on = env["FTLIB_BLOCK_CACHE"] == "1"
        runs.append(on)
        record = {"block_cache": on, "median_wall_s": 1.0 if on else 2.0, "median_sys_s": 0.0,
                  "median_minor_faults": 0, "peak_rss_mb": 1.0}  # fmt: skip
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(record), stderr="")

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "ab.json"
    argv = ["block_cache_ab.py", "--workloads=llama-tiny", "--modes=lora", "--rounds=2"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--out={out}"])
    block_cache_ab.main()
    assert runs == [True, False, False, True]
    assert [r["round"] for r in json.loads(out.read_text())] == [0, 0, 1, 1]

    never_preloaded = {"block_cache": False}
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **kw: types.SimpleNamespace(returncode=0, stdout=json.dumps(never_preloaded)),
    )
    with pytest.raises(SystemExit, match="not preloaded"):
        block_cache_ab.main()


def test_eval_time_sorted_layout_gives_each_row_its_own_slot():
    import eval_time
    import numpy as np

    from ftlib.data import Task

    exs = [
        {"input_ids": np.arange(n, dtype=np.int32), "loss_mask": np.ones(n, np.int32),
         "label": n % 2, "choice_pos": n - 2}
        for n in (5, 3, 9, 4, 7)
    ]  # fmt: skip
    task = Task({"train": [], "val": [], "test": exs}, np.array([1, 2]), {"max_tokens": 9},
                pad_id=0, seq_len=16, pad_to_multiple=4, pack=False, shuffle_seed=0)  # fmt: skip
    batches = eval_time.sorted_batches(task, 4)
    assert [b["input_ids"].shape for b in batches] == [(4, 8), (4, 12)]
    for b in batches:
        assert b["choice_pos"].shape == b["label"].shape == b["example_weight"].shape == (4, 1)
        lengths = (b["segment_ids"] > 0).sum(1)
        np.testing.assert_array_equal(b["choice_pos"][lengths > 0, 0], lengths[lengths > 0] - 2)
    assert sum(b["example_weight"].sum() for b in batches) == 5
