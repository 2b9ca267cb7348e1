"""ftlib.models.bert: a numpy reference and PyTorch transformers agree with it, the HF
tensor map refuses bad checkpoints, the head's shapes and pooling, dropout only in
training, and the trainer end to end on configs/minilm_rt_lora.py shrunk to 3 steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from configs import minilm_rt_lora
from ftlib import peft, sharding
from ftlib.errors import FtlibError
from ftlib.metrics import read_metrics
from ftlib.models import build_model
from ftlib.models.bert import BertClassifier, BertConfig, from_pretrained, hf_to_params
from ftlib.trainer import train_and_evaluate

CFG = BertConfig(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    max_positions=20,
    num_labels=3,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def hf_config(cfg):
    return {
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def random_hf_tensors(cfg, seed=0, classifier=False):
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size

    def w(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": w(cfg.vocab_size, d),
        "embeddings.position_embeddings.weight": w(cfg.max_positions, d),
        "embeddings.token_type_embeddings.weight": w(cfg.type_vocab_size, d),
        "embeddings.LayerNorm.weight": 1 + w(d),
        "embeddings.LayerNorm.bias": w(d),
        "pooler.dense.weight": w(d, d),
        "pooler.dense.bias": w(d),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {
            "attention.self.query": (d, d),
            "attention.self.key": (d, d),
            "attention.self.value": (d, d),
            "attention.output.dense": (d, d),
            "intermediate.dense": (f, d),
            "output.dense": (d, f),
        }.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = w(o, n), w(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(d), w(d)
    if classifier:
        t = {"bert." + k: v for k, v in t.items()}
        t["classifier.weight"], t["classifier.bias"] = w(cfg.num_labels, d), w(cfg.num_labels)
    return t


def reference(cfg, t, ids, mask):
    """HF BertModel + pooler in float64 numpy, written independently: (hidden [T, D], pooled)."""
    t = {k.removeprefix("bert."): v.astype(np.float64) for k, v in t.items()}
    T, N = len(ids), cfg.num_heads
    hd = cfg.hidden_size // N

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * t[p + ".weight"] + t[p + ".bias"]

    def dense(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    e = "embeddings."
    h = t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][:T]
    h = ln(h + t[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (
            dense(h, p + f"attention.self.{n}").reshape(T, N, hd) for n in ("query", "key", "value")
        )
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(mask[None, None, :], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, -1)
        h = ln(h + dense(o, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        x = dense(h, p + "intermediate.dense")
        x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
        h = ln(h + dense(x, p + "output.dense"), p + "output.LayerNorm")
    return h, np.tanh(dense(h[0], "pooler.dense"))


def test_matches_numpy_reference_with_padding():
    tensors = random_hf_tensors(CFG, classifier=True)
    model = from_pretrained(hf_config(CFG), tensors, num_labels=CFG.num_labels)
    ids = np.array([[2, 14, 15, 9, 26, 35, 0, 0], [2, 7, 41, 8, 1, 3, 4, 5]])
    mask = np.array([[1] * 6 + [0] * 2, [1] * 8])
    hidden = np.asarray(model.hidden(jnp.asarray(ids), jnp.asarray(mask)))
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert logits.shape == (2, CFG.num_labels)
    for b in range(2):
        want_h, pooled = reference(CFG, tensors, ids[b], mask[b].astype(bool))
        real = mask[b].astype(bool)
        np.testing.assert_allclose(hidden[b][real], want_h[real], atol=1e-4, rtol=1e-4)
        want_logits = pooled @ tensors["classifier.weight"].T + tensors["classifier.bias"]
        np.testing.assert_allclose(logits[b], want_logits, atol=1e-4, rtol=1e-4)


def test_matches_pytorch_transformers_on_minilm():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ftlib.hf import load_pretrained

    src = load_pretrained("all-minilm-l6-v2")
    model = from_pretrained(src.hf_config, src.tensors, num_labels=2)
    enc = src.tokenizer(
        ["a gripping, funny and humane film", "dull, and far too long for what it has to say"],
        padding=True,
        return_tensors="np",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask.min() == 0  # the batch has padding
    ours = np.asarray(model.hidden(jnp.asarray(ids), jnp.asarray(mask)))
    ref = transformers.BertModel.from_pretrained(src.tokenizer.name_or_path).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], out.last_hidden_state.numpy()[real], atol=1e-4)
    pooled = np.asarray(model.pool(jnp.asarray(ours), jnp.asarray(mask)))
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)


def test_head_shapes_and_mean_pooling_ignores_padding():
    cfg = dataclasses.replace(CFG, pooling="mean", scan_layers=False)  # eager: no scan compile
    model = BertClassifier(cfg, rngs=nnx.Rngs(0))
    assert model.pooler is None
    ids = jnp.asarray([[2, 14, 15, 9]])
    padded = jnp.asarray([[2, 14, 15, 9, 0, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0, 0]])
    logits = model(ids)
    assert logits.shape == (1, cfg.num_labels)
    np.testing.assert_allclose(model(padded, mask), logits, atol=1e-5)
    assert model.pool(model.hidden(ids)).shape == (1, cfg.hidden_size)


def test_scan_unrolled_and_remat_agree():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
    scanned = BertClassifier(CFG, rngs=nnx.Rngs(1))
    for other in (dict(scan_layers=False), dict(remat="full")):
        model = BertClassifier(dataclasses.replace(CFG, **other), rngs=nnx.Rngs(1))
        np.testing.assert_allclose(model(ids), scanned(ids), atol=1e-5)


def test_dropout_only_with_an_rng():
    cfg = dataclasses.replace(CFG, hidden_dropout=0.1, attention_dropout=0.1, scan_layers=False)
    model = BertClassifier(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
    np.testing.assert_array_equal(model(ids), model(ids))
    a, b = model(ids, rng=jax.random.key(0)), model(ids, rng=jax.random.key(1))
    assert not np.allclose(a, b) and not np.allclose(a, model(ids))
    np.testing.assert_array_equal(a, model(ids, rng=jax.random.key(0)))


def test_hf_map_rejects_bad_checkpoints():
    tensors = random_hf_tensors(CFG)
    # MLM / NSP heads of pre-training checkpoints are ignored, like HF's BertModel does.
    hf_to_params(CFG, {**tensors, "cls.predictions.bias": np.zeros(CFG.vocab_size)})
    with pytest.raises(FtlibError, match="does not use.*encoder.layer.0.extra.weight"):
        hf_to_params(CFG, {**tensors, "encoder.layer.0.extra.weight": np.zeros(3)})
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(FtlibError, match="no tensor encoder.layer.1.output.dense.bias"):
        hf_to_params(CFG, missing)
    bad = {**tensors, "embeddings.LayerNorm.bias": np.zeros(5, np.float32)}
    with pytest.raises(FtlibError, match=r"embeddings/norm/bias: checkpoint shape \(5,\)"):
        from_pretrained(hf_config(CFG), bad, num_labels=3)
    no_pooler = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    with pytest.raises(FtlibError, match="param pooler/.*model.pooling='mean'"):
        from_pretrained(hf_config(CFG), no_pooler, num_labels=3)
    assert from_pretrained(hf_config(CFG), no_pooler, num_labels=3, pooling="mean").pooler is None
    with pytest.raises(FtlibError, match="hidden_act 'gelu_new'"):
        from_pretrained({**hf_config(CFG), "hidden_act": "gelu_new"}, tensors, num_labels=3)


def test_new_head_is_seeded_and_checkpoint_head_loads():
    tensors = random_hf_tensors(CFG)
    a, b, c = (from_pretrained(hf_config(CFG), tensors, num_labels=3, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.classifier.kernel[...], b.classifier.kernel[...])
    assert not np.allclose(a.classifier.kernel[...], c.classifier.kernel[...])
    np.testing.assert_array_equal(a.classifier.bias[...], 0.0)
    with_head = random_hf_tensors(CFG, classifier=True)
    model = from_pretrained(hf_config(CFG), with_head, num_labels=3)
    np.testing.assert_array_equal(model.classifier.kernel[...], with_head["classifier.weight"].T)
    with pytest.raises(FtlibError, match=r"param classifier/\w+: checkpoint shape"):
        from_pretrained(hf_config(CFG), with_head, num_labels=2)


def test_lora_targets_and_sharding_rules_cover_every_param():
    c = minilm_rt_lora.get_config()
    model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    mask = peft.apply_method(model, c.peft)
    trainable = sorted(p for p, t in mask.trainable.items() if t)
    assert trainable == [
        "classifier/bias",
        "classifier/kernel",
        "encoder/attention/query/lora_a",
        "encoder/attention/query/lora_b",
        "encoder/attention/value/lora_a",
        "encoder/attention/value/lora_b",
    ]
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        sharding.logical_spec(axes, c.sharding_rules, name="/".join(map(str, path)))


def test_build_model_dispatch_errors():
    c = minilm_rt_lora.get_config()
    with pytest.raises(FtlibError, match="is a bert model, a sequence classifier: train it"):
        build_model(c.model, 0)
    c.model.checkpoint, c.model.tokenizer = "", "all-minilm-l6-v2"
    with pytest.raises(FtlibError, match="needs a pretrained encoder"):
        build_model(c.model, 0, num_labels=2)


def test_trainer_runs_minilm_config(tmp_path):
    c = minilm_rt_lora.get_config()
    c.max_steps, c.log_every, c.eval.every, c.checkpoint.every = 3, 3, 3, 3
    c.data.seq_len, c.data.pad_to_multiple = 32, 0  # one train and one eval shape to compile
    c.data.batch_size, c.data.eval_batch_size, c.eval.max_examples = 8, 128, 64
    summary = train_and_evaluate(c, str(tmp_path))
    assert summary["steps"] == 3 and summary["trainable_params"] == 74_498
    assert summary["test"]["examples"] == summary["data"]["test"] == 1091
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and np.isfinite(summary["test"]["loss"])
    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert {"step", "split", "loss", "accuracy"} <= set(train[0])
    assert {r["split"] for r in records} == {"train", "val", "test"}


# Every sharded dim (vocab 64, embed 16, mlp 32, heads 4x4) divides the mesh axes.
MESHES = ((1, 1, 1), (2, 2, 2), (1, 2, 4))


def multidevice_losses():
    """Run in a subprocess with 8 fake CPU devices: 3 LoRA + head steps of a tiny BERT
    classifier per mesh, sharded by the minilm config's rules. Prints JSON losses and
    final trainable params per mesh."""
    import json

    from ftlib import optim, steps

    c = minilm_rt_lora.get_config()
    c.optim.learning_rate = 1e-3
    rules = tuple(c.sharding_rules)
    cfg = dataclasses.replace(CFG, vocab_size=64)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, (3, 8))
    batches = [
        dict(
            input_ids=rng.integers(0, 64, (8, 12)).astype(np.int32),
            segment_ids=(np.arange(12) < lengths[i][:, None]).astype(np.int32),
            label=rng.integers(0, CFG.num_labels, 8).astype(np.int32),
        )
        for i in range(3)
    ]
    out = {}
    for shape in MESHES:
        mesh = sharding.make_mesh(
            dict(zip(sharding.MESH_AXES, shape)), jax.devices()[: np.prod(shape)]
        )
        model = BertClassifier(cfg, rngs=nnx.Rngs(0))
        mask = peft.apply_method(model, c.peft)
        tx = optim.make_optimizer(c.optim, 10)
        graphdef, state, frozen = steps.init_train_state(model, mask, tx)
        state_sh = sharding.tree_shardings(state, mesh, rules)
        frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
        state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
        step = jax.jit(
            steps.make_train_step(graphdef, tx, objective="sequence_classification"),
            donate_argnums=0,
            in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        )
        losses = []
        for b in batches:
            state, metrics = step(state, frozen, sharding.put_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        params = {
            "/".join(map(str, p)): np.asarray(v[...]).tolist()
            for p, v in nnx.to_flat_state(state.params)
        }
        out[",".join(map(str, shape))] = {"losses": losses, "params": params}
    print(json.dumps(out))


def test_sharded_classifier_steps_match_one_device():
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # Fewer XLA:CPU passes compile ~2x faster with the same fp32 results (as in
        # tests/multidevice_check.py).
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]),
    )
    code = "import test_bert; test_bert.multidevice_losses()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = runs["1,1,1"]
    for mesh, run in runs.items():
        np.testing.assert_allclose(run["losses"], ref["losses"], atol=1e-5, err_msg=mesh)
        for name, value in run["params"].items():
            np.testing.assert_allclose(
                value, ref["params"][name], atol=1e-5, err_msg=f"{mesh} {name}"
            )
    # The steps did train: LoRA's B starts at zero.
    assert np.abs(ref["params"]["encoder/attention/value/lora_b"]).max() > 1e-4
