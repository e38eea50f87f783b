"""Sources, tokenizer and the grain pipeline."""

import numpy as np
import pytest

from jaxlm.config import load
from jaxlm.data import pipeline, sources, tokenizer
from jaxlm.errors import UserError


@pytest.fixture(scope="module")
def prepared(corpus_dir, cache_dir, tmp_path_factory):
    cfg = load(None, ["data.source=text", f"data.paths=[{corpus_dir}/*.txt]", f"data.cache_dir={cache_dir}",
                      "data.vocab_size=400"]).data
    splits = sources.load_splits(cfg)
    tok = tokenizer.obtain(cfg, splits, tmp_path_factory.mktemp("wd"))
    return cfg, splits, tok


def test_splits_hold_all_documents_once(prepared, corpus_dir):
    _, splits, _ = prepared
    assert len(splits.train) > 0 and len(splits.eval) > 0
    texts = [splits.train[i]["text"].decode() for i in range(len(splits.train))]
    texts += [splits.eval[i]["text"].decode() for i in range(len(splits.eval))]
    total = sum(len(p.read_text().strip()) for p in corpus_dir.glob("*.txt"))
    assert total * 0.98 < sum(len(t) for t in texts) <= total
    assert all(len(t) <= sources.MAX_DOC_CHARS for t in texts)


def test_prepared_dataset_is_reused(prepared, capsys):
    cfg, splits, _ = prepared
    again = sources.load_splits(cfg)
    assert again.fingerprint == splits.fingerprint
    assert "preparing" not in capsys.readouterr().err


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


def test_train_batches_keys_shapes_and_packing(prepared):
    _, splits, tok = prepared
    it = pipeline.train_iterator(splits.train, tok, "text", seq_len=64, host_batch=4, seed=0)
    batch = next(it)
    assert set(batch) == set(pipeline.KEYS)
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
    starts = batch["inputs"][:, 1:][~same]
    assert (starts == tok.bos_id).all()
    assert (batch["targets"][:, :-1][~same] == tok.eos_id).all()


def test_positions_from_segments():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert pipeline.positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_iterator_state_resumes_at_the_same_batch(prepared):
    import json
    _, splits, tok = prepared
    it = pipeline.train_iterator(splits.train, tok, "text", 32, 4, seed=3)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.train_iterator(splits.train, tok, "text", 32, 4, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other_seed = next(pipeline.train_iterator(splits.train, tok, "text", 32, 4, seed=4))
    first = next(pipeline.train_iterator(splits.train, tok, "text", 32, 4, seed=3))
    assert not np.array_equal(first["inputs"], other_seed["inputs"])


def test_eval_batches_cover_split_with_padding(prepared):
    _, splits, tok = prepared
    batches = list(pipeline.eval_batches(splits.eval, tok, "text", 32, 4))
    assert all(b["inputs"].shape == (4, 32) for b in batches)
    tokens = sum(int((b["segment_ids"] != 0).sum()) for b in batches)
    expected = sum(len(tok.encode(splits.eval[i]["text"].decode())) + 1 for i in range(len(splits.eval)))
    assert tokens == expected
    assert len(list(pipeline.eval_batches(splits.eval, tok, "text", 32, 4, max_batches=1))) == 1


def test_missing_path_empty_corpus_and_bad_bytes(tmp_path, cache_dir):
    def cfg(*extra):
        return load(None, ["data.source=text", f"data.cache_dir={cache_dir}", *extra]).data

    with pytest.raises(UserError, match="matches no file"):
        sources.load_splits(cfg(f"data.paths=[{tmp_path}/nothing*.txt]"))
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(UserError, match="is in both data.paths and data.eval_paths"):
        sources.load_splits(cfg(f"data.paths=[{tmp_path}/*.txt]", f"data.eval_paths=[{tmp_path}/a.txt]"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        sources.load_splits(cfg(f"data.paths=[{tmp_path}/empty.txt]"))
    (tmp_path / "bad.txt").write_bytes(b"good text\nthen \xff bad")
    with pytest.raises(UserError, match=r"bad.txt' is not valid UTF-8 \(byte 15"):
        sources.load_splits(cfg(f"data.paths=[{tmp_path}/bad.txt]"))
    replaced = sources.load_splits(cfg(f"data.paths=[{tmp_path}/bad.txt]", "data.encoding_errors=replace"))
    assert replaced.eval[0]["text"].decode() == "then \ufffd bad"  # a lone file's tail is held out
    assert replaced.train[0]["text"].decode() == "good text"


def test_cut_prefers_paragraph_breaks():
    text = ("word " * 100 + "\n\n") * 100
    pieces = sources._cut(text)
    assert all(len(p) <= sources.MAX_DOC_CHARS for p in pieces)
    assert all(p.endswith("word") for p in pieces)
    assert sum(len(p.split()) for p in pieces) == 10_000


def test_catalog_dataset_through_the_same_pipeline(cache_dir, tmp_path):
    """TFDS catalog names load by name (mocked here: the real ones need a network)."""
    import tensorflow_datasets as tfds
    cfg = load(None, ["data.source=tfds", "data.name=imdb_reviews", f"data.cache_dir={cache_dir}",
                      "data.vocab_size=300"]).data
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = sources.load_splits(cfg)  # no "validation" split: falls back to "test"
        assert len(splits.train) == 40 and len(splits.eval) == 40
        tok = tokenizer.obtain(cfg, splits, tmp_path)
        batch = next(pipeline.train_iterator(splits.train, tok, "text", 16, 2, seed=0))
        assert batch["inputs"].shape == (2, 16)
        bad = load(None, ["data.source=tfds", "data.name=imdb_reviews", "data.text_key=body",
                          f"data.cache_dir={cache_dir}"]).data
        with pytest.raises(UserError, match="data.text_key='body' is not a feature of imdb_reviews"):
            sources.load_splits(bad)
