"""The token store: round trips across shards, dtypes, resuming an interrupted build, workers,
refusal of another tokenizer, tokenizer sampling, and `python -m jaxlm.prepare`."""

import json

import numpy as np
import pytest

from jaxlm.data import build, sources, store
from jaxlm.errors import UserError


def texts_of(corpus_dir):
    return [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]


def make(texts, tok, directory, shard_chars, workers=1):
    build.build(iter(texts), tok.tokenizer, tok.bos_id, tok.eos_id, directory, shard_chars, workers,
                "test-source", "test-tok", "test", len(texts))
    return store.TokenStore(directory, "test-tok")


def store_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_every_document_comes_back_in_order_across_shards(prepared, corpus_dir, tmp_path):
    _, _, tok = prepared
    texts = [t[i:i + 3000] for t in texts_of(corpus_dir) for i in range(0, len(t), 3000)]
    tokens = make(texts, tok, tmp_path, shard_chars=10_000)
    assert len(tokens.offsets) - 1 > 5 and tokens.documents == len(texts)
    assert tokens.dtype == np.uint16  # a 400-token vocabulary
    starts = tokens.document_starts()
    ends = np.append(starts[1:], tokens.tokens)
    for text, a, b in zip(texts, starts, ends):
        ids = tokens.ids(int(a), int(b))
        assert ids[0] == tok.bos_id and ids[1:].tolist() == tok.encode(text)
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    assert manifest["tokens"] == tokens.tokens and manifest["tokenizer"] == "test-tok"


def test_windows_across_shard_edges_equal_one_shard(prepared, corpus_dir, tmp_path):
    """Inputs, targets, documents and starts of any window are the same however the stream is sharded."""
    _, _, tok = prepared
    texts = [t[i:i + 700] for t in texts_of(corpus_dir)[:3] for i in range(0, len(t), 700)]
    one = make(texts, tok, tmp_path / "one", shard_chars=10**9)
    many = make(texts, tok, tmp_path / "many", shard_chars=1500)
    assert len(one.offsets) == 2 and len(many.offsets) > 10
    rng = np.random.default_rng(0)
    edges = many.offsets[1:-1]
    for a in [*(edges - 3), *rng.integers(0, one.tokens - 300, 20)]:
        b = int(a) + int(rng.integers(1, 300))
        want, got = one.window(int(a), b), many.window(int(a), b)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of [{a}, {b})")
    whole = one.window(0, one.tokens)
    assert (whole["targets"] == tok.eos_id).sum() == len(texts)  # every document ends with EOS


def test_uint32_store_round_trip(tmp_path):
    big = [np.array([70_000, 5, 131_071], np.int64), np.array([65_536], np.int64)]
    dtype = store.dtype_for(140_000)
    assert dtype == np.uint32 and store.dtype_for(65_536) == np.uint16
    counts = [store.write_shard(tmp_path, 0, big[:1], 1, dtype), store.write_shard(tmp_path, 1, big[1:], 1, dtype)]
    store.write_manifest(tmp_path, counts, dtype, "t", "s", 1, 2)
    tokens = store.TokenStore(tmp_path)
    assert tokens.ids(0, tokens.tokens).tolist() == [1, 70_000, 5, 131_071, 1, 65_536]
    assert tokens.window(0, 6)["targets"].tolist() == [70_000, 5, 131_071, 2, 65_536, 2]


def test_interrupted_build_resumes_to_the_same_store(prepared, corpus_dir, tmp_path):
    _, _, tok = prepared
    texts = [t[i:i + 2000] for t in texts_of(corpus_dir) for i in range(0, len(t), 2000)]
    clean = make(texts, tok, tmp_path / "clean", shard_chars=8000)

    def killed_after(n):
        yield from texts[:n]
        raise KeyboardInterrupt  # the run is stopped here

    with pytest.raises(KeyboardInterrupt):
        build.build(killed_after(len(texts) // 2), tok.tokenizer, tok.bos_id, tok.eos_id,
                    tmp_path / "resumed", 8000, 1, "test-source", "test-tok", "test")
    assert not store.is_finished(tmp_path / "resumed")
    finished = store.finished_shards(tmp_path / "resumed")
    assert finished
    stamps = {i: (tmp_path / "resumed" / f"{store.shard_name(i)}.tokens").stat().st_mtime_ns for i in finished}
    with pytest.raises(UserError, match="not a finished token store"):
        store.TokenStore(tmp_path / "resumed")
    resumed = make(texts, tok, tmp_path / "resumed", shard_chars=8000)
    assert store_files(resumed.directory) == store_files(clean.directory)
    for i, stamp in stamps.items():  # finished shards were not tokenized again
        assert (tmp_path / "resumed" / f"{store.shard_name(i)}.tokens").stat().st_mtime_ns == stamp


def test_worker_processes_write_the_same_store(prepared, corpus_dir, tmp_path):
    _, _, tok = prepared
    texts = [t[i:i + 2000] for t in texts_of(corpus_dir) for i in range(0, len(t), 2000)]
    alone = make(texts, tok, tmp_path / "alone", shard_chars=20_000)
    workers = make(texts, tok, tmp_path / "workers", shard_chars=20_000, workers=2)
    assert len(alone.offsets) > 3
    assert store_files(workers.directory) == store_files(alone.directory)


def test_a_store_of_another_tokenizer_is_refused(prepared, tmp_path):
    _, _, tok = prepared
    make(["some text", "more text"], tok, tmp_path, shard_chars=100)
    with pytest.raises(UserError, match="made with another tokenizer"):
        store.TokenStore(tmp_path, "another-tok")


def test_tokenizer_sample_is_deterministic_and_bounded():
    texts = [f"document {i} " * (i % 7 + 1) for i in range(2000)]
    size = sum(map(len, texts))
    first = list(sources.sample(iter(texts), size, 5000, seed=0))
    assert first == list(sources.sample(iter(texts), size, 5000, seed=0))
    assert first != list(sources.sample(iter(texts), size, 5000, seed=1))
    assert 5000 <= sum(map(len, first)) < 5000 + 100
    assert texts.index(first[-1]) > 1000  # drawn from the whole corpus, not its head
    assert list(sources.sample(iter(texts), size, 0, seed=0)) == texts  # 0: all of it
    head = list(sources.sample(iter(texts), None, 500, seed=0))  # size unknown: the first documents
    assert head == texts[:len(head)] and sum(map(len, head[:-1])) < 500 <= sum(map(len, head))


def test_prepare_command_then_train_reuses_the_store(tiny, tmp_path, capfd):
    from jaxlm import prepare, train
    args = [*tiny, "data.shard_mb=0.05", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2",
            "train.eval_every=2", "checkpoint.every=2"]
    prepare.main(["--workdir", str(tmp_path / "run"), *args])
    out = capfd.readouterr()
    assert "preparing the train token store" in out.err
    assert "train: " in out.out and "shard(s) of uint16" in out.out
    train.main(["--workdir", str(tmp_path / "run"), *args])
    assert "preparing" not in capfd.readouterr().err


def test_workers_end_when_prepare_is_killed(tiny, tmp_path, corpus_dir):
    """SIGKILL to `prepare` mid-build leaves no worker behind, and the rerun finishes the store."""
    import os
    import signal
    import subprocess
    import sys
    import time
    big = tmp_path / "big"
    big.mkdir()
    for k in range(30):
        for f in corpus_dir.glob("*.txt"):
            os.link(f, big / f"{k}-{f.name}")
    args = [sys.executable, "-m", "jaxlm.prepare", *tiny, f"data.paths=[{big}/*.txt]", "data.shard_mb=0.2",
            "data.prepare_workers=2", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "preparing the train token store" in line:
            break
    deadline = time.time() + 120
    while not list((tmp_path / "cache" / "stores").glob("*/train/*.json")) and time.time() < deadline:
        time.sleep(0.2)
    shards = next((tmp_path / "cache" / "stores").glob("*/train"))
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers and list(shards.glob("*.json")) and not (shards / "manifest.json").exists()
    deadline = time.time() + 15
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "a worker outlived prepare"
    subprocess.run(args, check=True, capture_output=True)
    assert (shards / "manifest.json").is_file()


def test_a_cache_from_before_token_stores_is_rebuilt_with_a_note(prepared, tmp_path, capfd):
    import dataclasses

    from jaxlm.data import pipeline
    cfg, splits, tok = prepared
    (tmp_path / "tokens" / "abc" / "train").mkdir(parents=True)  # the old layout: .npy arrays per split
    stores = pipeline.token_stores(splits, tok, dataclasses.replace(cfg, cache_dir=str(tmp_path)))
    err = capfd.readouterr().err
    assert "tokens hold tokenized text in the format before token stores" in err and "can be deleted" in err
    assert stores["train"].tokens > 0
