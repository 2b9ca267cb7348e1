"""Tests for ftlib.data on a tiny word-level tokenizer and small fixture files."""

import csv
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ftlib.data import DataError, choice_token_ids, load_task, pipeline
from ftlib.data import splits as splits_lib

WORDS = (
    "Review : Sentiment negative positive very good bad movie film the a is was fun dull "
    "plot acting great awful hello hi how are you fine thanks Q A what two plus four user "
    "assistant system"
).split()
RT_FILE = pathlib.Path("/tmp/assets/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")


@pytest.fixture(scope="module")
def tok():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama's tokenizer: the plain call puts a bos in front.
    t.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=t,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<bos> assistant : {% endif %}"
    )
    return tokenizer


def make_cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        {
            "source": "jsonl",
            "path": "",
            "tfds_name": "",
            "tfds_split": "train",
            "tfds_data_dir": "",
            "format": "classification",
            "text_field": "text",
            "prompt_field": "prompt",
            "completion_field": "completion",
            "messages_field": "messages",
            "label_field": "label",
            "id_field": "",
            "prompt_template": "Review: {text}\nSentiment:",
            "label_words": ("negative", "positive"),
            "seq_len": 32,
            "pad_to_multiple": 4,
            "pack": False,
            "split": (0.8, 0.1, 0.1),
            "split_seed": 0,
            "batch_size": 4,
            "eval_batch_size": 4,
            "max_eval_examples": 0,
            "shuffle_seed": 0,
            "group_by_length": 0,
        }
    )
    cfg.update(overrides)
    return cfg


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def reviews(n, start=0):
    texts = [
        "a good movie",
        "the plot was dull",
        "great acting",
        "awful film",
        "very fun",
        "the movie is bad",
        "a great great film was fun",
        "dull",
    ]
    return [
        {
            "id": f"r{i}",
            "text": texts[i % len(texts)] + " " + "a " * (i % 5),
            "label": int(i % 8 in (0, 2, 4, 6)),
        }
        for i in range(start, start + n)
    ]


def words(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def all_examples(task):
    return [e for name in ("train", "val", "test") for e in task.examples[name]]


# ---------------------------------------------------------------- formats and loss masks


def test_classification_jsonl(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(40)))
    task = load_task(cfg, tok)
    np.testing.assert_array_equal(
        task.choice_token_ids, tok.convert_tokens_to_ids(["negative", "positive"])
    )
    assert sum(task.stats[s] for s in ("train", "val", "test")) == 40
    ex = task.examples["train"][0]
    toks = words(tok, ex["input_ids"])
    assert toks[:3] == ["<bos>", "Review", ":"]
    assert toks[-3:-1] == ["Sentiment", ":"]
    assert toks[-1] == ["negative", "positive"][ex["label"]]
    assert ex["choice_pos"] == len(toks) - 2
    np.testing.assert_array_equal(ex["loss_mask"], [0] * (len(toks) - 1) + [1])
    assert ex["input_ids"].dtype == ex["loss_mask"].dtype == np.int32


def test_text_format(tok, tmp_path):
    cfg = make_cfg(format="text", path=write_jsonl(tmp_path / "d.jsonl", reviews(20)))
    for ex in all_examples(load_task(cfg, tok)):
        toks = words(tok, ex["input_ids"])
        assert toks[0] == "<bos>" and toks[-1] == "<eos>"
        np.testing.assert_array_equal(ex["loss_mask"], [0] + [1] * (len(toks) - 1))


def test_prompt_completion_masks_only_completion(tok, tmp_path):
    rows = [
        {"prompt": f"Q what is two plus two {'a ' * i}", "completion": "A four"} for i in range(20)
    ]
    cfg = make_cfg(
        format="prompt_completion",
        split=(1.0, 0.0, 0.0),
        path=write_jsonl(tmp_path / "d.jsonl", rows),
    )
    task = load_task(cfg, tok)
    assert task.stats["truncated"] == 0
    for ex in task.examples["train"]:
        toks = words(tok, ex["input_ids"])
        target = [t for t, m in zip(toks, ex["loss_mask"]) if m]
        assert target == ["A", "four", "<eos>"]
        assert toks[-3:] == target and toks[:2] == ["<bos>", "Q"]


def test_chat_masks_only_assistant_turns(tok, tmp_path):
    conv = [
        {"role": "system", "content": "fine"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    cfg = make_cfg(
        format="chat",
        split=(1.0, 0.0, 0.0),
        path=write_jsonl(tmp_path / "d.jsonl", [{"messages": conv}] * 3),
    )
    ex = load_task(cfg, tok).examples["train"][0]
    toks = words(tok, ex["input_ids"])
    assert toks == tok.convert_ids_to_tokens(tok.apply_chat_template(conv, return_dict=False))
    spans, current = [], []
    for t, m in zip(toks, ex["loss_mask"]):
        if m:
            current.append(t)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    assert spans == [["hi", "<eos>"], ["fine", "thanks", "<eos>"]]


def test_csv_source_with_string_labels(tok, tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for r in reviews(30):
            w.writerow([r["text"], ["negative", "positive"][r["label"]]])
    cfg = make_cfg(
        source="csv",
        path=str(path),
        text_field="review",
        label_field="sentiment",
        prompt_template="Review: {review}\nSentiment:",
    )
    task = load_task(cfg, tok)
    labels = [e["label"] for e in all_examples(task)]
    assert sorted(labels) == sorted(r["label"] for r in reviews(30))


def test_tfds_source(tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        task = load_task(make_cfg(source="tfds", tfds_name="imdb_reviews"), tok)
    assert sum(task.stats[s] for s in ("train", "val", "test")) == 30
    assert {e["label"] for e in all_examples(task)} <= {0, 1}


# ---------------------------------------------------------------- truncation


def test_classification_truncation_keeps_template_frame(tok, tmp_path):
    rows = [{"text": "good " * 50 + "bad", "label": 1}] * 10
    cfg = make_cfg(seq_len=12, split=(1.0, 0.0, 0.0), path=write_jsonl(tmp_path / "d.jsonl", rows))
    task = load_task(cfg, tok)
    assert task.stats["truncated"] == 10 and task.stats["max_tokens"] == 12
    toks = words(tok, task.examples["train"][0]["input_ids"])
    assert toks == ["<bos>", "Review", ":"] + ["good"] * 6 + ["Sentiment", ":", "positive"]


def test_classification_needs_a_prompt_token_before_the_label(tmp_path):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()  # no BOS: an empty text is no token
    no_bos = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    rows = reviews(5) + [{"text": "", "label": "positive"}]
    cfg = make_cfg(prompt_template="{text}", path=write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"record \d+: no prompt token before its label word"):
        load_task(cfg, no_bos)


def test_sequence_classification_frames_text_and_truncates_inside(tmp_path):
    # A BERT-like tokenizer: <bos> plays [CLS] and <eos> plays [SEP].
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    bert_tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")
    rows = [{"text": "good " * 50 + "bad", "label": "positive"}] + reviews(19)
    cfg = make_cfg(
        format="sequence_classification",
        seq_len=8,
        split=(1.0, 0.0, 0.0),
        path=write_jsonl(tmp_path / "d.jsonl", rows),
    )
    task = load_task(cfg, bert_tok)
    assert task.choice_token_ids is None and task.num_classes == 2
    assert task.stats["truncated"] == sum(len(r["text"].split()) > 6 for r in rows) > 1
    by_text = {tuple(words(bert_tok, e["input_ids"])): e for e in task.examples["train"]}
    assert by_text[("<bos>",) + ("good",) * 6 + ("<eos>",)]["label"] == 1
    assert by_text[("<bos>", "great", "acting", "<eos>")]["label"] == 1
    assert by_text[("<bos>", "the", "plot", "was", "dull", "a", "<eos>")]["label"] == 0
    assert all(not e["loss_mask"].any() for e in task.examples["train"])
    batch = next(task.train_iterator(4))
    assert batch["label"].shape == (4,) and "choice_pos" not in batch


def test_prompt_completion_truncation_keeps_completion(tok, tmp_path):
    rows = [{"prompt": "Q " + "a " * 40 + "what", "completion": "A four"}] * 5
    cfg = make_cfg(
        format="prompt_completion",
        seq_len=8,
        split=(1.0, 0.0, 0.0),
        path=write_jsonl(tmp_path / "d.jsonl", rows),
    )
    task = load_task(cfg, tok)
    assert task.stats["truncated"] == 5
    assert words(tok, task.examples["train"][0]["input_ids"]) == [
        "<bos>",
        "a",
        "a",
        "a",
        "what",
        "A",
        "four",
        "<eos>",
    ]
    # A completion that alone overflows loses its end, leaving the prompt's last token.
    rows = [{"prompt": "Q what", "completion": "A " + "four " * 20}] * 5
    cfg.path = write_jsonl(tmp_path / "e.jsonl", rows)
    task = load_task(cfg, tok)
    assert task.stats["truncated"] == 5
    ex = task.examples["train"][0]
    assert words(tok, ex["input_ids"]) == ["<bos>", "what", "A"] + ["four"] * 5
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0] + [1] * 6)


# ---------------------------------------------------------------- splits


def test_split_is_stable_under_appends_and_deterministic(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(300)), id_field="id")
    before = load_task(cfg, tok)
    again = load_task(cfg, tok)
    for name in ("train", "val", "test"):
        assert len(before.examples[name]) == len(again.examples[name])
        for a, b in zip(before.examples[name], again.examples[name]):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # Appended rows never move an existing row: each split's old ids are unchanged, in order.
    old = splits_lib.split_records(reviews(300), cfg.split, 0, "id")
    grown = splits_lib.split_records(reviews(400), cfg.split, 0, "id")
    for name, records in old.items():
        kept = [r["id"] for r in grown[name] if int(r["id"][1:]) < 300]
        assert kept == [r["id"] for r in records]


def test_split_ratios_and_seed(tok):
    records = [{"text": f"row {i}"} for i in range(5000)]
    out = splits_lib.split_records(records, (0.7, 0.2, 0.1), seed=3, id_field="")
    fractions = [len(out[n]) / 5000 for n in ("train", "val", "test")]
    np.testing.assert_allclose(fractions, [0.7, 0.2, 0.1], atol=0.02)
    other = splits_lib.split_records(records, (0.7, 0.2, 0.1), seed=4, id_field="")
    assert out["val"] != other["val"]
    assert not splits_lib.split_records(records, (1.0, 0.0, 0.0), 0, "")["val"]


def test_bad_ratios(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(40)), split=(0.8, 0.1, 0.2))
    with pytest.raises(DataError, match="summing to 1"):
        load_task(cfg, tok)


def test_empty_split(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(5)), split=(0.9, 0.05, 0.05))
    with pytest.raises(DataError, match=r"split '(val|test)' is empty \(5 records: train="):
        load_task(cfg, tok)


# ---------------------------------------------------------------- bad input


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON \("):
        load_task(make_cfg(path=str(path)), tok)


def test_missing_field_names_file_line_and_field(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'label'"):
        load_task(make_cfg(path=str(path)), tok)


def test_csv_without_columns_lists_found_columns(tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\ngood,5\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\].*\['review', 'stars'\]"):
        load_task(make_cfg(source="csv", path=str(path)), tok)


def test_multi_token_label_word(tok, tmp_path):
    cfg = make_cfg(label_words=("bad", "very good"))
    with pytest.raises(DataError, match=r"'very good'.* is 2 tokens \['very', 'good'\]"):
        choice_token_ids(cfg, tok)


def test_template_field_and_label_errors(tok, tmp_path):
    cfg = make_cfg(
        path=write_jsonl(tmp_path / "d.jsonl", reviews(20)), prompt_template="{title}: {text}"
    )
    with pytest.raises(DataError, match="names 'title'"):
        load_task(cfg, tok)
    rows = [{"text": "a", "label": 7}] * 20
    cfg = make_cfg(path=write_jsonl(tmp_path / "e.jsonl", rows), split=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match="label 7"):
        load_task(cfg, tok)


# ---------------------------------------------------------------- batches


def check_rows(batch, pad_id):
    """Padding is pad_id / segment 0 / no loss, and positions restart in every segment."""
    for b in range(batch["input_ids"].shape[0]):
        seg, pos = batch["segment_ids"][b], batch["positions"][b]
        pad = seg == 0
        assert (batch["input_ids"][b][pad] == pad_id).all()
        assert not batch["loss_mask"][b][pad].any()
        n = int((~pad).sum())
        assert not pad[:n].any()  # Real tokens come first.
        for s in np.unique(seg[:n]):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))


def test_bucketed_padding_shapes(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(80)), seq_len=32)
    task = load_task(cfg, tok)
    it = task.train_iterator(4)
    for _ in range(10):
        batch = next(it)
        longest = int((batch["segment_ids"] > 0).sum(1).max())
        t = batch["input_ids"].shape[1]
        assert t % 4 == 0 and t - 4 < longest <= t
        assert {k: v.dtype for k, v in batch.items()} == {
            k: np.int32
            for k in ("input_ids", "loss_mask", "segment_ids", "positions", "label", "choice_pos")
        }
        assert batch["label"].shape == batch["choice_pos"].shape == (4,)
        check_rows(batch, tok.pad_token_id)
    task.pad_to_multiple = 0
    assert next(task.train_iterator(4))["input_ids"].shape == (4, 32)


def test_packing(tok, tmp_path):
    cfg = make_cfg(
        format="text", pack=True, seq_len=24, path=write_jsonl(tmp_path / "d.jsonl", reviews(60))
    )
    task = load_task(cfg, tok)
    known = {tuple(e["input_ids"]): tuple(e["loss_mask"]) for e in task.examples["train"]}
    it = task.train_iterator(4)
    segments = 0
    for _ in range(5):
        batch = next(it)
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 24
        check_rows(batch, tok.pad_token_id)
        for b in range(4):
            seg = batch["segment_ids"][b]
            ids = set(seg[seg > 0])
            assert ids == set(range(1, len(ids) + 1))
            for s in ids:
                piece = tuple(batch["input_ids"][b][seg == s])
                assert known[piece] == tuple(batch["loss_mask"][b][seg == s])
                segments += 1
    assert segments > 20  # Several examples share a row.


def test_eval_batches_one_example_per_row_for_a_class_head(tok, tmp_path):
    cfg = make_cfg(
        format="sequence_classification",
        path=write_jsonl(tmp_path / "d.jsonl", reviews(50)),
        split=(0.5, 0.5, 0.0),
    )
    task = load_task(cfg, tok)
    assert task.eval_row_len() == 0
    n = len(task.examples["val"])
    batches = list(task.eval_batches("val", 8))
    assert len(batches) == -(-n // 8) and all(b["input_ids"].shape[0] == 8 for b in batches)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.dtype == np.float32 and weights.sum() == n and (weights[:n] == 1).all()
    last = batches[-1]
    assert not last["segment_ids"][weights[-8:] == 0].any()
    # Batches hold the examples sorted by length (stable): little padding per batch.
    by_length = sorted(task.examples["val"], key=lambda e: len(e["input_ids"]))
    labels = np.concatenate([b["label"] for b in batches])[:n]
    np.testing.assert_array_equal(labels, [e["label"] for e in by_length])
    lengths = [int((b["segment_ids"] > 0).sum(1).max()) for b in batches]
    assert lengths == sorted(lengths)
    capped = list(task.eval_batches("val", 8, max_examples=5))
    assert len(capped) == 1 and capped[0]["weight"].sum() == 5
    assert list(task.eval_batches("test", 8)) == []


def segments(batch):
    """(row, segment id, its tokens) of every example in a batch."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            out.append((r, int(s), tuple(batch["input_ids"][r][seg == s])))
    return out


def test_eval_batches_pack_a_causal_lm(tok, tmp_path):
    cfg = make_cfg(path=write_jsonl(tmp_path / "d.jsonl", reviews(60)), split=(0.4, 0.3, 0.3))
    task = load_task(cfg, tok)
    row_len = task.eval_row_len()
    assert row_len % 4 == 0 and row_len - 4 < task.stats["max_tokens"] <= row_len
    choices = task.choice_token_ids
    # Slots per row: as many as the shortest val or test example allows (not train's).
    shortest = min(len(e["input_ids"]) for s in ("val", "test") for e in task.examples[s])
    assert task.eval_slots_per_row("val") == task.eval_slots_per_row("test") == row_len // shortest
    for split in ("val", "test"):
        examples = task.examples[split]
        batches = list(task.eval_batches(split, 4))
        # One shape for every split's batches; several examples share a row.
        assert {b["input_ids"].shape for b in batches} == {(4, row_len)}
        assert sum(b["weight"].sum() for b in batches) < len(examples)
        pieces = []
        for b in batches:
            check_rows(b, tok.pad_token_id)
            slots = b["example_weight"] > 0
            assert slots.shape == (4, row_len // shortest)
            assert not b["segment_ids"][b["weight"] == 0].any()
            for r in range(4):
                # Row r's slots hold its examples, each at its own label-word prediction.
                pos = b["choice_pos"][r][slots[r]]
                assert len(pos) == len(set(b["segment_ids"][r][b["segment_ids"][r] > 0]))
                assert len(set(pos)) == len(pos) and (b["segment_ids"][r][pos] > 0).all()
                np.testing.assert_array_equal(
                    b["input_ids"][r][pos + 1], choices[b["label"][r][slots[r]]]
                )
                np.testing.assert_array_equal(
                    b["segment_ids"][r][pos], b["segment_ids"][r][pos + 1]
                )
            pieces += [p for _, _, p in segments(b)]
        # Every example exactly once.
        assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples)
        again = list(task.eval_batches(split, 4))
        for a, b in zip(batches, again):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    capped = list(task.eval_batches("val", 4, max_examples=5))
    assert sum(b["example_weight"].sum() for b in capped) == 5
    task.examples["test"] = []
    assert list(task.eval_batches("test", 4)) == []


def test_packed_rows_best_fit_decreasing():
    lengths = np.random.default_rng(0).integers(1, 40, 500)
    rows = pipeline.packed_rows(lengths, 48)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 48 for r in rows)
    # Best-fit decreasing uses at most 11/9 of the fewest rows possible, plus one.
    assert len(rows) <= 11 / 9 * -(-lengths.sum() // 48) + 1
    assert pipeline.packed_rows(np.array([5, 3, 2]), 5) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="6 tokens"):
        pipeline.packed_rows(np.array([6]), 5)


@pytest.mark.parametrize("pack,group", [(False, 0), (True, 0), (False, 2)])
def test_iterator_state_resume(tok, tmp_path, pack, group):
    fmt = "text" if pack else "classification"
    cfg = make_cfg(
        format=fmt,
        pack=pack,
        path=write_jsonl(tmp_path / "d.jsonl", reviews(30)),
        group_by_length=group,
    )
    task = load_task(cfg, tok)
    it = task.train_iterator(4)
    for _ in range(9):  # Past an epoch boundary (24 train rows = 6 batches unpacked).
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]
    resumed = task.train_iterator(4)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_epochs_are_reshuffled(tok, tmp_path):
    cfg = make_cfg(
        path=write_jsonl(tmp_path / "d.jsonl", reviews(40)),
        split=(1.0, 0.0, 0.0),
        pad_to_multiple=0,
    )
    it = load_task(cfg, tok).train_iterator(40)
    first, second = next(it), next(it)
    assert not np.array_equal(first["input_ids"], second["input_ids"])

    def rows(batch):
        return sorted(map(tuple, batch["input_ids"]))

    assert rows(first) == rows(second)  # Each epoch is a permutation of the same rows.


# ---------------------------------------------------------------- the real asset


def test_rt_snippets_real_file(tok, monkeypatch):
    import ftlib.assets

    path = RT_FILE
    if not path.exists() and ftlib.assets.is_cached("rt-snippets"):
        path = ftlib.assets.asset_path("rt-snippets")
    if not path.exists():
        pytest.skip("the RT snippets asset is not cached here")
    monkeypatch.setattr(ftlib.assets, "asset_path", lambda name: path)
    task = load_task(make_cfg(source="rt_snippets", seq_len=128), tok)
    counts = [task.stats[s] for s in ("train", "val", "test")]
    assert sum(counts) == 10_568  # 10,605 rows less the 37 with a mean score of 0.
    np.testing.assert_allclose(np.array(counts) / sum(counts), [0.8, 0.1, 0.1], atol=0.015)
    positive = np.mean([e["label"] for e in all_examples(task)])
    assert abs(positive - 5242 / 10568) < 1e-9


def test_length_grouped_order_covers_epoch_and_groups_lengths():
    from ftlib.data.pipeline import length_grouped_order

    lengths = np.random.default_rng(0).integers(5, 60, 1003)
    b = length_grouped_order(lengths, 8, 4, seed=3, epoch=0)
    assert b.shape == (125, 8) and len(np.unique(b)) == 1000  # each example at most once
    np.testing.assert_array_equal(b, length_grouped_order(lengths, 8, 4, seed=3, epoch=0))
    assert not np.array_equal(b, length_grouped_order(lengths, 8, 4, seed=3, epoch=1))
    # Padding to each batch's longest row: grouping wastes far less than random batches.
    waste = lambda batches: sum(lengths[x].max() * len(x) - lengths[x].sum() for x in batches)
    random_batches = np.random.default_rng(3).permutation(1003)[:1000].reshape(125, 8)
    assert waste(b) < 0.5 * waste(random_batches)
