"""Preparing with Apache Beam (`data.prepare_runner`): the DirectRunner, in worker processes,
writes the local build's token stores byte for byte, under each corpus-wide rule; it resumes
without tokenizing finished shards again; TFDS splits are read in pieces."""

import pytest

pytest.importorskip("apache_beam")

from jaxlm import prepare  # noqa: E402
from jaxlm.config import load  # noqa: E402
from jaxlm.data import pipeline, sources, store  # noqa: E402
from jaxlm.data.catalog import CatalogCorpus  # noqa: E402
from jaxlm.errors import UserError  # noqa: E402

BEAM = ["data.prepare_runner=DirectRunner", "data.prepare_workers=2"]


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def stores(overrides, tok, cache):
    cfg = load(None, [*overrides, f"data.cache_dir={cache}"]).data
    return pipeline.token_stores(sources.load_corpus(cfg), tok, cfg)


def assert_same_stores(overrides, tok, tmp_path, beam=BEAM):
    """Builds the config's stores locally (one process) and with Beam; returns the local ones."""
    local = stores([*overrides, "data.prepare_workers=1"], tok, tmp_path / "local")
    made = stores([*overrides, *beam], tok, tmp_path / "beam")
    for split in ("train", "eval"):
        assert files(made[split].directory) == files(local[split].directory), split
    return local


def test_direct_runner_writes_the_local_store(prepared, corpus_dir, tmp_path):
    _, _, tok = prepared
    local = assert_same_stores(["data.source=text", f"data.paths=[{corpus_dir}/*.txt]", "data.eval_fraction=0.3",
                                "data.shard_mb=0.008"], tok, tmp_path)
    assert len(local["train"].offsets) - 1 > 5  # shards span files, and files span shards
    assert local["eval"].documents >= 1  # held out by their keys


@pytest.mark.parametrize("case", ["nothing held out", "a lone document"])
def test_corpus_wide_rules_hold_in_pieces(prepared, corpus_dir, tmp_path, case):
    """With no document held out by its key the last is, and a lone document's tail is: rules
    over the whole corpus, which a pipeline of pieces settles from counts."""
    _, _, tok = prepared
    if case == "a lone document":
        (tmp_path / "one").mkdir()
        (tmp_path / "one" / "only.txt").write_text("a short text of a few words\nand a second line to hold out")
        paths = f"{tmp_path}/one/*.txt"
    else:
        paths = f"{corpus_dir}/*.txt"
    local = assert_same_stores(["data.source=text", f"data.paths=[{paths}]", "data.eval_fraction=0.0001",
                                "data.shard_mb=0.05"], tok, tmp_path)
    assert local["eval"].documents == 1


def test_an_interrupted_beam_build_resumes_without_redoing_shards(prepared, corpus_dir, tmp_path):
    """The first build is `python -m jaxlm.prepare --runner`, with a runner option."""
    cfg, _, tok = prepared
    overrides = ["data.source=text", f"data.paths=[{corpus_dir}/*.txt]", "data.shard_mb=0.008",
                 f"data.vocab_size={cfg.vocab_size}", f"data.tokenizer={tmp_path / 'tokenizer.json'}"]
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    prepare.main(["--runner", "DirectRunner", "--direct_num_workers=2", *overrides, f"data.cache_dir={tmp_path}"])
    made = sorted((tmp_path / "stores").iterdir())
    overrides += BEAM
    first = stores(overrides, tok, tmp_path)["train"].directory
    assert [first.parent] == made  # the store prepare made
    whole = files(first)
    (first / store.MANIFEST).unlink()  # as if stopped before the last shards were written
    finished = sorted(store.finished_shards(first))
    for i in finished[len(finished) // 2:]:
        for suffix in ("json", "tokens", "starts"):
            (first / f"{store.shard_name(i)}.{suffix}").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = stores(overrides, tok, tmp_path)["train"].directory
    assert files(again) == whole
    assert all((again / name).stat().st_mtime_ns == stamp for name, stamp in kept.items())


def test_catalog_splits_are_read_in_pieces(corpus_dir, cache_dir, tmp_path, monkeypatch, prepared):
    from conftest import prepare_catalog
    _, _, tok = prepared
    texts = [t[i:i + 3000] for t in (p.read_text() for p in sorted(corpus_dir.glob("*.txt")))
             for i in range(0, len(t), 3000)]
    prepare_catalog("imdb_reviews/plain_text", tmp_path / "tfds", {
        "train": [{"text": t, "label": 0} for t in texts[:-5]], "test": [{"text": t, "label": 1} for t in texts[-5:]]})
    monkeypatch.setattr(CatalogCorpus, "PIECE_RECORDS", 4)  # in this process: the in-memory runner
    overrides = ["data.source=tfds", "data.name=imdb_reviews", f"data.tfds_dir={tmp_path / 'tfds'}",
                 "data.shard_mb=0.02"]
    cfg = load(None, overrides).data
    assert sources.load_corpus(cfg).pieces("train") == -(-(len(texts) - 5) // 4) > 5
    assert_same_stores(overrides, tok, tmp_path,
                       beam=[*BEAM, "data.beam_options=[--direct_running_mode=in_memory]"])


def test_without_apache_beam_the_error_says_what_to_install(prepared, corpus_dir, tmp_path, monkeypatch):
    import importlib.util
    _, _, tok = prepared
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apache_beam" else real(name, *a))
    with pytest.raises(UserError, match=r'pip install -e "\.\[beam\]"'):
        stores(["data.source=text", f"data.paths=[{corpus_dir}/*.txt]", *BEAM], tok, tmp_path)
