"""Sources, tokenizer, tokenized rows and the grain pipeline."""

import numpy as np
import pytest

from jaxlm.config import load
from jaxlm.data import pipeline, sources, tokenizer
from jaxlm.errors import UserError


def test_splits_hold_all_documents_once(prepared, corpus_dir):
    _, splits, _ = prepared
    texts, held = list(splits.texts("train")), list(splits.texts("eval"))
    assert texts and held and splits.count("train") is None  # not known before reading
    texts += held
    total = sum(len(p.read_text().strip()) for p in corpus_dir.glob("*.txt"))
    assert total * 0.98 < sum(len(t) for t in texts) <= total
    assert all(len(t) <= sources.MAX_DOC_CHARS for t in texts)


def test_file_documents_streamed_in_blocks_equal_the_whole_file_cut(tmp_path, monkeypatch):
    """Reading a file in small blocks cuts it exactly as reading it whole does."""
    rng = np.random.default_rng(0)
    words = ["word", "two words", "\n", "\n\n", "  ", "é", "日本", "\t"]
    text = "\n \n" + "".join(rng.choice(words, 30_000)) + " \n\n "
    path = tmp_path / "t.txt"
    path.write_text(text)
    monkeypatch.setattr(sources, "_BLOCK", 4099)  # cuts multi-byte characters between blocks
    streamed = list(sources.file_documents(path, "strict"))
    assert len(streamed) > 3
    assert streamed == sources._cut(text)


def test_tokenizer_round_trip_and_specials(prepared):
    _, _, tok = prepared
    text = "Return a new dict — with ünïcode & {braces}\n\ttabs."
    assert tok.decode(tok.encode(text)) == text
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.vocab_size == 400
    lengths = tok.byte_lengths()
    assert lengths[tok.bos_id] == 0
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode())


def test_tokenizer_loads_from_file(prepared, tmp_path):
    _, _, tok = prepared
    tok.save(tmp_path / "t.json")
    loaded = tokenizer.from_file(tmp_path / "t.json")
    assert loaded.encode("hello world") == tok.encode("hello world")
    with pytest.raises(UserError, match="not found"):
        tokenizer.from_file(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tokens(prepared):
    """The corpus's token stores: several shards each (the fixture's data.shard_mb is tiny)."""
    cfg, splits, tok = prepared
    stores = pipeline.token_stores(splits, tok, cfg)
    assert len(stores["train"].offsets) > 4  # more than 3 shards
    return stores


def test_token_store_is_reused(prepared, tokens, capfd):
    cfg, splits, tok = prepared
    stamp = (tokens["train"].directory / "00000.tokens").stat().st_mtime_ns
    again = pipeline.token_stores(splits, tok, cfg)
    assert again["train"].directory == tokens["train"].directory
    assert (tokens["train"].directory / "00000.tokens").stat().st_mtime_ns == stamp
    assert "preparing" not in capfd.readouterr().err


@pytest.mark.parametrize("shard_chars", [4, 10**6], ids=["a shard per document", "one shard"])
def test_rows_pack_documents_with_segments_and_positions(tmp_path, prepared, shard_chars):
    from jaxlm.data import build, store
    _, _, tok = prepared
    docs = [{"text": t} for t in ("one two three", "four", "five six seven eight nine ten")]
    build.build(iter(d["text"] for d in docs), tok.tokenizer, tok.bos_id, tok.eos_id, tmp_path, shard_chars,
                1, "test", "tok", "test")
    rows = pipeline.TokenRows(store.TokenStore(tmp_path), 8, whole_rows=False)
    assert len(rows.store.offsets) - 1 == (3 if shard_chars == 4 else 1)
    ids = [[tok.bos_id, *tok.encode(d["text"])] for d in docs]
    stream = sum(ids, [])
    assert rows.tokens == len(stream) and len(rows) == -(-len(stream) // 8)
    got = np.stack([rows[r]["inputs"] for r in range(len(rows))]).ravel()
    assert got[:len(stream)].tolist() == stream and not got[len(stream):].any()
    expected_seg, expected_pos = [], []
    for r in range(len(rows)):  # segment ids and positions restart in every row
        seg, pos, last = [], [], None
        for k in range(r * 8, min(r * 8 + 8, len(stream))):
            doc = max(i for i in range(3) if sum(map(len, ids[:i])) <= k)
            seg.append(seg[-1] + (doc != last) if seg else 1)
            pos.append(pos[-1] + 1 if doc == last else 0)
            last = doc
        expected_seg += seg + [0] * (8 - len(seg))
        expected_pos += pos + [0] * (8 - len(pos))
    assert np.stack([rows[r]["segment_ids"] for r in range(len(rows))]).ravel().tolist() == expected_seg
    assert np.stack([rows[r]["positions"] for r in range(len(rows))]).ravel().tolist() == expected_pos
    ends = np.stack([rows[r]["targets"] for r in range(len(rows))]).ravel()
    assert (ends == tok.eos_id).sum() == 3  # each document ends with EOS


def test_train_batches_keys_shapes_and_packing(prepared, tokens):
    _, _, tok = prepared
    rows = pipeline.TokenRows(tokens["train"], 64, whole_rows=True)
    batch = next(pipeline.TrainBatches(rows, 4, seed=0))
    assert set(batch) == {*pipeline.KEYS, "row_ids"}
    assert batch.pop("row_ids").tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]  # global positions (high, low)
    for v in batch.values():
        assert v.shape == (4, 64) and v.dtype == np.int32
    seg, pos = batch["segment_ids"], batch["positions"]
    assert (seg > 0).all()  # training rows are full: no padding
    same = seg[:, 1:] == seg[:, :-1]
    # targets are the next inputs within a document; positions count up within a segment
    assert (batch["inputs"][:, 1:] == batch["targets"][:, :-1])[same].all()
    assert (pos[:, 1:] == pos[:, :-1] + 1)[same].all()
    assert (pos[:, 1:] == 0)[~same].all()
    # documents start with BOS (unless continued from the previous row) and end with EOS
    assert (batch["inputs"][:, 1:][~same] == tok.bos_id).all()
    assert (batch["targets"][:, :-1][~same] == tok.eos_id).all()


def test_position_resumes_at_the_same_batch(tokens):
    import json
    rows = pipeline.TokenRows(tokens["train"], 32, whole_rows=True)
    it = pipeline.TrainBatches(rows, 4, seed=3)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    assert state == {"next_row": 28, "format": pipeline.DATA_FORMAT}
    expected = [next(it) for _ in range(3)]
    assert expected[0]["row_ids"][:, 1].tolist() == [28, 29, 30, 31]
    resumed = pipeline.TrainBatches(rows, 4, seed=3, next_row=state["next_row"])
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other_seed = next(pipeline.TrainBatches(rows, 4, seed=4))
    first = next(pipeline.TrainBatches(rows, 4, seed=3))
    assert not np.array_equal(first["inputs"], other_seed["inputs"])


def test_row_ids_do_not_wrap_in_long_runs(tokens):
    rows = pipeline.TokenRows(tokens["train"], 32, whole_rows=True)
    start = 2**32 - 2  # rows ~4e9 into a run
    ids = next(pipeline.TrainBatches(rows, 4, seed=3, next_row=start))["row_ids"]
    assert ids.tolist() == [[0, 2**32 - 2], [0, 2**32 - 1], [1, 0], [1, 1]]
    wrapped = next(pipeline.TrainBatches(rows, 4, seed=3, next_row=start - 2**31))["row_ids"]
    assert not np.array_equal(ids, wrapped)


def test_prefetch_reads_a_bounded_number_of_batches_ahead(tokens):
    """Host memory holds `data.prefetch` batches ahead, not hundreds."""
    import time

    class Counted(pipeline.TokenRows):
        reads = 0

        def __getitem__(self, r):
            Counted.reads += 1
            return super().__getitem__(r)

    rows = Counted(tokens["train"], 32, whole_rows=True)
    assert len(rows) > 200
    batches = pipeline.TrainBatches(rows, 4, seed=0)  # data.prefetch=2 by default
    next(batches)
    time.sleep(1.0)  # let background threads read as far ahead as they may
    assert Counted.reads <= 4 * (1 + 2 + 2)  # the batch taken, the buffer, one in flight per thread


def test_position_carries_over_process_count_and_batch_size(tokens):
    """The guarantee: 2 processes, then 1 process with another batch size, see every row of
    the epoch exactly once (and the epochs reshuffle)."""
    rows = pipeline.TokenRows(tokens["train"], 32, whole_rows=True)
    n = len(rows)
    assert n > 40
    seen = []
    hosts = [pipeline.TrainBatches(rows, 4, seed=5, process_index=i, process_count=2) for i in range(2)]
    for _ in range(5):  # 5 steps of a global batch of 4 on 2 processes
        for host in hosts:
            seen += list(next(host)["inputs"])
    position = hosts[0].get_state()
    assert position == hosts[1].get_state() == {"next_row": 20, "format": pipeline.DATA_FORMAT}
    single = pipeline.TrainBatches(rows, 6, seed=5, next_row=position["next_row"])
    while len(seen) < n + 6:
        seen += list(next(single)["inputs"])
    epoch, after = seen[:n], seen[n:]

    def key(row):
        return row.tobytes()

    assert sorted(map(key, epoch)) == sorted(key(rows[r]["inputs"]) for r in range(n))
    assert [key(r) for r in after] != [key(r) for r in epoch[:len(after)]]


def test_eval_batches_cover_split_the_same_on_any_process_count(prepared, tokens):
    _, splits, tok = prepared
    rows = pipeline.TokenRows(tokens["eval"], 32, whole_rows=False)
    batches = list(pipeline.eval_batches(rows, 4))
    assert all(b["inputs"].shape == (4, 32) for b in batches)
    count = sum(int((b["segment_ids"] != 0).sum()) for b in batches)
    expected = sum(len(tok.encode(text)) + 1 for text in splits.texts("eval"))
    assert count == expected
    parts = [list(pipeline.eval_batches(rows, 4, process_index=i, process_count=2)) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(batches)
    for whole, a, b in zip(batches, *parts):
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([a["inputs"], b["inputs"]]))
    assert len(list(pipeline.eval_batches(rows, 4, max_batches=1))) == 1


def test_missing_path_empty_corpus_and_bad_bytes(tmp_path, cache_dir):
    def cfg(*extra):
        return load(None, ["data.source=text", f"data.cache_dir={cache_dir}", *extra]).data

    with pytest.raises(UserError, match="matches no file"):
        sources.load_corpus(cfg(f"data.paths=[{tmp_path}/nothing*.txt]"))
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(UserError, match="is in both data.paths and data.eval_paths"):
        sources.load_corpus(cfg(f"data.paths=[{tmp_path}/*.txt]", f"data.eval_paths=[{tmp_path}/a.txt]"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        list(sources.load_corpus(cfg(f"data.paths=[{tmp_path}/empty.txt]")).texts("train"))
    (tmp_path / "bad.txt").write_bytes(b"good text\nthen \xff bad")
    with pytest.raises(UserError, match=r"bad.txt' is not valid UTF-8 \(byte 15"):
        list(sources.load_corpus(cfg(f"data.paths=[{tmp_path}/bad.txt]")).texts("train"))
    replaced = sources.load_corpus(cfg(f"data.paths=[{tmp_path}/bad.txt]", "data.encoding_errors=replace"))
    assert list(replaced.texts("eval")) == ["then \ufffd bad"]  # a lone file's tail is held out
    assert list(replaced.texts("train")) == ["good text"]


def test_cut_prefers_paragraph_breaks():
    text = ("word " * 100 + "\n\n") * 100
    pieces = sources._cut(text)
    assert all(len(p) <= sources.MAX_DOC_CHARS for p in pieces)
    assert all(p.endswith("word") for p in pieces)
    assert sum(len(p.split()) for p in pieces) == 10_000


def test_catalog_dataset_through_the_same_pipeline(corpus_dir, cache_dir, tmp_path):
    """A TFDS catalog name loads by name from a prepared data directory (no network needed then)."""
    from conftest import prepare_catalog
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    prepare_catalog("imdb_reviews/plain_text", tmp_path / "tfds", {
        "train": [{"text": t, "label": 0} for t in texts[:5]], "test": [{"text": t, "label": 1} for t in texts[5:]]})
    common = ["data.source=tfds", "data.name=imdb_reviews", f"data.tfds_dir={tmp_path / 'tfds'}",
              f"data.cache_dir={cache_dir}", "data.vocab_size=300"]
    cfg = load(None, common).data
    splits = sources.load_corpus(cfg)  # no "validation" split: falls back to "test"
    assert splits.count("train") == 5 and splits.count("eval") == len(texts) - 5
    assert sorted(splits.texts("eval")) == sorted(texts[5:])
    tok = tokenizer.obtain(cfg, splits, tmp_path)
    rows = pipeline.TokenRows(pipeline.token_stores(splits, tok, cfg)["train"], 16, whole_rows=True)
    batch = next(pipeline.TrainBatches(rows, 2, seed=0))
    assert batch["inputs"].shape == (2, 16)
    with pytest.raises(UserError, match="data.text_key='body' is not a feature of imdb_reviews"):
        sources.load_corpus(load(None, [*common, "data.text_key=body"]).data)
    with pytest.raises(UserError, match="'no_such_set' is not a TFDS catalog dataset"):
        sources.load_corpus(load(None, [*common, "data.name=no_such_set"]).data)


def test_held_out_documents_do_not_depend_on_where_the_corpus_lives(corpus_dir, tmp_path):
    import shutil
    held = []
    for where in ("a", "b/c"):
        copy = tmp_path / where / "corpus"
        shutil.copytree(corpus_dir, copy)
        cfg = load(None, ["data.source=text", f"data.paths=[{copy}/*.txt]", "data.eval_fraction=0.5",
                          f"data.cache_dir={tmp_path / where / 'cache'}"]).data
        held.append(sorted(sources.load_corpus(cfg).texts("eval")))
    assert held[0] == held[1] and len(held[0]) >= 2


def test_a_small_corpus_still_gets_an_eval_split(tmp_path):
    """Keys hashed into no held-out document: the last one is held out (in one pass, one
    document behind); every document held out: an error."""
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    keys = ["a.txt:0", "b.txt:0"]

    def corpus(fraction):
        return sources.load_corpus(load(None, ["data.source=text", f"data.paths=[{tmp_path}/*.txt]",
                                               f"data.eval_fraction={fraction}"]).data)

    assert not any(sources._is_eval(k, 0.01) for k in keys)
    small = corpus(0.01)
    assert list(small.texts("train")) == ["first file"] and list(small.texts("eval")) == ["second file"]
    assert all(sources._is_eval(k, 0.999) for k in keys)
    with pytest.raises(UserError, match="every document is held out"):
        list(corpus(0.999).texts("train"))
