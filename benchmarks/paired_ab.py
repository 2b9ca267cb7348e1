"""Paired A/B of train-step variants in one process: alternating steps, median ratios.

  python benchmarks/paired_ab.py --workload=llama-small --mode=full --variants=plain_head
  python benchmarks/paired_ab.py --variants=plain_head,layer_loop,one_query_block --steps=12
  python benchmarks/paired_ab.py --workload=llama-1b --dtype=bfloat16 \
      --variants=layer_scan,no_triton_gemm  # on a GPU

On a noisy shared machine, separate processes differ by ±15% from run to run; here
every variant is compiled up front, then each round runs one step of each (order
reversed every other round), so slow spells hit all of them. Reported per variant:
median step seconds and the median over rounds of its step time / the baseline's
(`ftlib`, the library as it is). Variants are context managers that change how
the step is built (tracing happens inside them), or XLA options for its compile
(COMPILER_OPTIONS); add one to test an idea. A variant that fails to build is
reported and left out. `--clock=cpu` times each step in this process's CPU seconds
instead: the work a change removes, which other tenants' load moves far less than the
wall clock (it is not the step time: idle and spinning threads count differently; on a
GPU it is host time only).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import time
import types
from unittest import mock

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import step_time  # noqa: E402


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _config_override(**changes):
    base = step_time.llama_config
    override = lambda *a, **kw: dataclasses.replace(base(*a, **kw), **changes)  # noqa: E731
    return _patched(step_time, "llama_config", override)


def _plain_head():
    """The LM head writes whole [B, T, V] logits and autodiff differentiates optax's loss."""
    from ftlib.models.llama import Llama

    return _patched(Llama, "output_projection", lambda self: None)


def _one_query_block():
    """Causal attention without query blocks (the whole [T, T] score matrix)."""
    from ftlib.models import attention

    return _patched(attention, "query_blocks", lambda T, target=128: 1)


def _select_mask():
    """Causal attention's scores masked with a select (jnp.where), not an added bias."""
    import jax.numpy as jnp

    from ftlib.models import attention

    select = lambda s, keep: jnp.where(keep, s, attention.NEG_INF)  # noqa: E731
    return _patched(attention, "mask_scores", select)


def _query_rows(rows: int):
    """Causal attention's query blocks of about `rows` rows instead of the path's own
    (128 as XLA's ops, attention.KERNEL_BLOCK_ROWS = 64 in the attention kernel)."""
    from ftlib.models import attention

    blocks = attention.query_blocks
    return _patched(attention, "query_blocks", lambda T, target=128: blocks(T, rows))


@contextlib.contextmanager
def _autodiff_norm_mlp():
    """RMSNorm and SwiGLU differentiated by autodiff (more saved activations): their
    custom_vjp's undecorated forward functions. On the CPU kernels' path this also turns
    off products.swiglu_product, whose backward is SwiGLU's (CPU runs of this variant before
    2026-11-27, session 24, had it on)."""
    from ftlib.models import layers, llama

    with _patched(layers, "rms_norm", layers.rms_norm.fun):
        with _patched(llama, "swiglu", layers.swiglu.fun), _down_saves_h():
            yield


def _down_saves_h():
    """The MLP as swiglu, then down_proj's own call (whose products save h = swiglu(gate,
    up) for the weight gradients: W's, or LoRA's A), not products.swiglu_product (h
    recomputed in SwiGLU's backward kernel)."""
    from ftlib.models import products

    return _patched(products, "swiglu_product_applies", lambda *operands: False)


def _separate_projections():
    """q, k, v (and gate, up) as separate products, each saving its input, their input
    gradients added by XLA, not products.shared_input_products."""
    from ftlib.models import products

    return _patched(products, "shared_input_applies", lambda *operands: False)


def _frozen_bf16():
    """The frozen base stored in bf16 (`model.frozen_dtype`), not cast from fp32 each step."""
    from ftlib import steps

    init = steps.init_train_state
    return _patched(steps, "init_train_state", lambda m, mask, tx: init(m, mask, tx, "bfloat16"))


def _fused_grads():
    """No barrier after the gradients: XLA fuses a stacked param's per-layer gradient
    concatenation into the norm reductions and the optimizer update."""
    from ftlib import steps

    return _patched(steps, "materialized", lambda grads: grads)


def _argmax_accuracy():
    """Token accuracy from jnp.argmax (a variadic value + index reduction) in the fused head."""
    import jax.numpy as jnp

    from ftlib import linear_cross_entropy as lce

    argmax_is = lambda logits_NV, max_N, target_N: jnp.argmax(logits_NV, -1) == target_N  # noqa: E731
    return _patched(lce, "is_first_max", argmax_is)


def _head_rows(rows: int):
    """The fused LM head's blocks of about `rows` logits rows (block_rows' fit)."""
    from ftlib import linear_cross_entropy as lce

    return _patched(lce, "block_rows", lambda D: rows)


def _dw_contract_tokens():
    """matmul's weight gradient contracts x and g over tokens in one dot_general, with
    no explicit transpose of x behind a barrier."""
    import jax

    from ftlib.models import layers

    def bwd(res, g_TO):
        x_TI, w_IO = res
        x_NI, g_NO = x_TI.reshape(-1, x_TI.shape[-1]), g_TO.reshape(-1, g_TO.shape[-1])
        dw = jax.lax.dot_general(x_NI, g_NO, (((0,), (0,)), ((), ())))
        return layers.dot(g_TO, w_IO.T), dw

    matmul = jax.custom_vjp(layers.matmul.fun)
    matmul.defvjp(layers._matmul_fwd, bwd)
    return _patched(layers, "matmul", matmul)


def _recompute_probs():
    """Blocked attention saves log-sum-exps and recomputes probabilities in the backward:
    attention_recompute.py."""
    import attention_recompute

    from ftlib.models import attention

    stack = contextlib.ExitStack()
    stack.enter_context(_attention_ops())
    stack.enter_context(_patched(attention, "_causal", attention_recompute.causal))
    return stack


def _adapter_in_product(rule):
    """LoRA's adapter inside the base product (lora.in_product) where rule(d_in, d_out)
    says, else two products and an add (on the CPU, not lora.accumulated_product)."""
    from ftlib.peft import lora

    stack = contextlib.ExitStack()
    stack.enter_context(_patched(lora, "adapter_in_base_product", rule))
    stack.enter_context(_patched(lora, "adapter_accumulated", lambda *operands: False))
    return stack


def _indexed_layers():
    """The layer loop (as `layer_loop`), taking layer i as x[i] (its transpose:
    zero-padded arrays summed), not through lax.split (layer_stack.layer_slices)."""
    import jax

    from ftlib.models import layer_stack

    def indexed(tree, L):
        return [jax.tree.map(lambda x: x[i], tree) for i in range(L)]

    stack = contextlib.ExitStack()
    stack.enter_context(_config_override(scan_layers=False))
    stack.enter_context(_patched(layer_stack, "layer_slices", indexed))
    return stack


def _first_layer_input_grad():
    """The layer scan's backward computes layer 0's input gradient too, as before
    layer_stack skipped it where nothing below the layers trains. Only the scan has it:
    on a CPU the workloads' default up to 16 layers is the loop (--layers=32 scans)."""
    from ftlib.models import layer_stack

    return _patched(layer_stack, "input_differentiated", lambda x, params: None)


def _sliced_frozen_weights(scan_layers=None):
    """Frozen weights sliced out of their stacks for each layer (a copy per layer, forward
    and backward), as before layer_stack's LayerViews."""
    import jax

    from ftlib.models import layer_stack

    stack = contextlib.ExitStack()
    if scan_layers is not None:
        stack.enter_context(_config_override(scan_layers=scan_layers))
    none = lambda h, xs: [False] * len(jax.tree.leaves(xs))  # noqa: E731
    stack.enter_context(_patched(layer_stack, "viewed", none))
    return stack


def _rope_xla(scan_layers=None):
    """RoPE in XLA's ops, as before rope_kernel: XLA fuses the tables' cos and sin into
    each consumer (with scan_layers=False: in the layer loop, per head and layer)."""
    from ftlib.models import layers, llama

    stack = contextlib.ExitStack()
    if scan_layers is not None:
        stack.enter_context(_config_override(scan_layers=scan_layers))
    stack.enter_context(_patched(llama, "apply_rope", layers._rope_xla))
    return stack


def _uninitialized_scan_stacks():
    """lax.scan's stacked outputs without the zero fill: uninitialized_stacks.py."""
    import uninitialized_stacks

    return uninitialized_stacks.patched()


def _xla_gemm():
    """fp32 CPU products in XLA's kernels instead of MKL's (FTLIB_CPU_GEMM=xla)."""
    return mock.patch.dict(os.environ, {"FTLIB_CPU_GEMM": "xla"})


def _xla_batched_products():
    """The attention's batched products in XLA's kernels, the rest as ftlib runs it
    (the blocked attention as ops: attention_kernel.cc off)."""
    from ftlib import mkl_gemm

    stack = contextlib.ExitStack()
    stack.enter_context(_attention_ops())
    stack.enter_context(_patched(mkl_gemm, "einsum_transposes", lambda spec: None))
    return stack


def _kernel_off(module: str, name: str):
    """module.name (an ftlib kernel module the code asks `applies`) replaced by a stub that
    always says no, so that code keeps XLA's ops."""
    import importlib

    stub = types.SimpleNamespace(applies=lambda *operands: False)
    return _patched(importlib.import_module(module), name, stub)


def _xla_lora_products():
    """LoRA's rank-r products in XLA's kernels, beside the base product in MKL and an add
    (not accumulated into its output)."""
    return _kernel_off("ftlib.peft.lora", "mkl_gemm")


def _xla_softmax_xent():
    """The LM head's per-block softmax cross-entropy in XLA's ops, not softmax_xent.cc."""
    return _kernel_off("ftlib.linear_cross_entropy", "softmax_xent")


def _xla_swiglu_backward():
    """SwiGLU's backward in XLA's ops, not swiglu_backward.cc."""
    return _kernel_off("ftlib.models.layers", "swiglu_backward")


def _xla_rms_norm():
    """RMSNorm forward and backward in XLA's ops, not rms_norm_kernel.cc."""
    return _kernel_off("ftlib.models.layers", "rms_norm_kernel")


def _attention_ops():
    """The blocked causal attention as XLA ops around MKL's batched products and
    masked_softmax.cc (the path before attention_kernel.cc): its transposes, block
    copies and concatenations."""
    return _kernel_off("ftlib.models.attention", "attention_kernel")


def _xla_attention_softmax():
    """The blocked attention's softmax in XLA's ops (YNNPACK's fusion), not masked_softmax.cc
    (the blocked attention as ops: attention_kernel.cc off)."""
    stack = contextlib.ExitStack()
    stack.enter_context(_attention_ops())
    stack.enter_context(_kernel_off("ftlib.models.attention", "masked_softmax"))
    return stack


def _xla_adamw():
    """The optimizer step as optax's chain compiles it in XLA, not adamw_kernel.cc."""
    return _kernel_off("ftlib.optim", "fused_adamw")


def _xla_elementwise():
    """All three elementwise C++ kernels off: the head's softmax, SwiGLU's backward and
    RMSNorm in XLA's ops (the products stay in MKL)."""
    stack = contextlib.ExitStack()
    for variant in (_xla_softmax_xent, _xla_swiglu_backward, _xla_rms_norm):
        stack.enter_context(variant())
    return stack


VARIANTS = {
    "ftlib": contextlib.nullcontext,
    "plain_head": _plain_head,
    "layer_loop": lambda: _config_override(scan_layers=False),
    "layer_scan": lambda: _config_override(scan_layers=True),
    "unroll2": lambda: _config_override(scan_unroll=2),
    "one_query_block": _one_query_block,
    "select_mask": _select_mask,
    "query_rows_64": lambda: _query_rows(64),
    "query_rows_128": lambda: _query_rows(128),
    "query_rows_256": lambda: _query_rows(256),
    "autodiff_norm_mlp": _autodiff_norm_mlp,
    "down_saves_h": _down_saves_h,
    "separate_projections": _separate_projections,
    "frozen_bf16": _frozen_bf16,
    "fused_grads": _fused_grads,
    # LoRA: two products everywhere / the in-product everywhere / for q, o, gate and up.
    "lora_two_products": lambda: _adapter_in_product(lambda d_in, d_out: False),
    "adapter_in_product_all": lambda: _adapter_in_product(lambda d_in, d_out: True),
    "adapter_in_product_not_narrow": lambda: _adapter_in_product(lambda i, o: o >= i),
    "head_rows_128": lambda: _head_rows(128),
    "head_rows_512": lambda: _head_rows(512),
    "dw_contract_tokens": _dw_contract_tokens,
    "recompute_probs": _recompute_probs,
    "argmax_accuracy": _argmax_accuracy,
    "uninitialized_scan_stacks": _uninitialized_scan_stacks,
    "first_layer_input_grad": _first_layer_input_grad,
    "rope_xla": _rope_xla,
    "layer_loop_rope_xla": lambda: _rope_xla(scan_layers=False),
    "indexed_layers": _indexed_layers,
    "sliced_frozen_weights": _sliced_frozen_weights,
    "layer_scan_sliced_frozen_weights": lambda: _sliced_frozen_weights(scan_layers=True),
    "xla_gemm": _xla_gemm,
    "xla_batched_products": _xla_batched_products,
    "xla_lora_products": _xla_lora_products,
    "xla_softmax_xent": _xla_softmax_xent,
    "xla_swiglu_backward": _xla_swiglu_backward,
    "xla_rms_norm": _xla_rms_norm,
    "xla_elementwise": _xla_elementwise,
    "xla_adamw": _xla_adamw,
    "xla_attention_softmax": _xla_attention_softmax,
    "attention_ops": _attention_ops,
}
# Variants that are XLA options of the step's compile (GPU flags: xla/debug_options_flags.cc).
COMPILER_OPTIONS = {
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "no_command_buffer": {"xla_gpu_enable_command_buffer": ""},
    # GPU: merge products that share an input (q/k/v, gate/up) up to 4 GB, not 32 MB.
    "dot_merger": {"xla_gpu_dot_merger_threshold_mb": 4096},
    "no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},  # CPU: Eigen dots, not YNNPACK's
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},  # CPU: older loop emitters
    "ynn_no_individual_dots": {  # CPU: YNNPACK for elementwise and reduction fusions only
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    },
    # CPU: products as oneDNN fusions (XLA's oneDNN runtime, built into jaxlib), not
    # YNNPACK's; YNNPACK off, or kept for elementwise and reduction fusions. (The fusion
    # type LIBRARY_FUSION_TYPE_DOT aborts the process: "partition compile failed".)
    "onednn_dots": {
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
        "xla_cpu_experimental_ynn_fusion_type": "",
    },
    "onednn_dots_ynn_rest": {
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    },
    "vector_width_512": {"xla_cpu_prefer_vector_width": 512},  # CPU: AVX-512 in XLA's own loops
    "fast_math": {"xla_cpu_enable_fast_math": True},  # CPU: LLVM fast-math in XLA's loops
    "no_concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "memory_scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    # LLVM's optimization level for the generated kernels (XLA's default: 3), and its
    # expensive passes off: compile time against step time.
    "llvm_o0": {"xla_backend_optimization_level": 0},
    "llvm_o1": {"xla_backend_optimization_level": 1},
    "llvm_o2": {"xla_backend_optimization_level": 2},
    "llvm_cheap": {"xla_llvm_disable_expensive_passes": True},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="llama-tiny", choices=list(step_time.WORKLOADS))
    parser.add_argument("--mode", default="full", choices=step_time.MODES)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", default="auto", help="ftlib's model.attention")
    known = [*VARIANTS, *COMPILER_OPTIONS]
    parser.add_argument("--variants", default="plain_head", help=f"comma list of {known}")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds after 3 warm-up")
    parser.add_argument("--layers", type=int, default=0, help="the workload at this depth")
    parser.add_argument("--grad_clip_norm", type=float, default=0.0, help="0: no clipping")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: step seconds; cpu: this process's CPU seconds per step (the work done, "
        "which other tenants' load barely moves: for changes that remove work)",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    step_clock = time.perf_counter if args.clock == "wall" else time.process_time
    names = ["ftlib", *[v for v in args.variants.split(",") if v != "ftlib"]]
    unknown = set(names) - set(known)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {known}")

    import numpy as np

    rounds = step_time.WARMUP + args.steps
    batches = step_time.batches(args.workload, rounds)
    runs = {}
    depth = contextlib.nullcontext
    if args.layers:
        depth = lambda: _config_override(num_layers=args.layers)  # noqa: E731
    for name in list(names):
        try:
            with depth(), VARIANTS.get(name, contextlib.nullcontext)():
                cfg = step_time.llama_config(args.workload, args.dtype, args.attention)
                step, state, frozen, _ = step_time.train_setup(
                    cfg, args.mode, rounds, args.grad_clip_norm
                )
                start = time.perf_counter()
                lowered = step.lower(state, frozen, batches[0])
                step = lowered.compile(COMPILER_OPTIONS.get(name))
        except Exception as e:  # noqa: BLE001 - a broken variant must not stop the others
            if name == "ftlib":
                raise
            print(f"variant {name} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
            names.remove(name)
            continue
        runs[name] = {"step": step, "state": state, "frozen": frozen, "times": []}
        runs[name]["compile_s"] = time.perf_counter() - start
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            run = runs[name]
            start = step_clock()
            run["state"], metrics = run["step"](run["state"], run["frozen"], batches[i])
            metrics["loss"].block_until_ready()
            if i >= step_time.WARMUP:
                run["times"].append(step_clock() - start)
    base = np.array(runs["ftlib"]["times"])
    records = []
    for name in names:
        times = np.array(runs[name]["times"])
        record = {
            "workload": args.workload,
            "mode": args.mode,
            "variant": name,
            "dtype": args.dtype,
            "layers": args.layers or step_time.WORKLOADS[args.workload].layers,
            "grad_clip_norm": args.grad_clip_norm,
            "clock": args.clock,
            "median_step_s": float(np.median(times)),
            "paired_ratio_to_ftlib": float(np.median(times / base)),
            "compile_s": runs[name]["compile_s"],
            "step_times_s": times.tolist(),
        }
        records.append(record)
        print(
            f"{args.workload} {args.mode} {name:16s} {record['median_step_s']:.3f} "
            f"{'s' if args.clock == 'wall' else 'CPU s'}/step  "
            f"paired ratio {record['paired_ratio_to_ftlib']:.3f}  "
            f"compile {record['compile_s']:.1f} s",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
