"""Data mixtures: proportions, the same rows on any process count, each source's own epochs,
exact resume, per-source eval metrics, and config mistakes."""

import json

import numpy as np
import pytest

from jaxlm.config import load
from jaxlm.data import build, pipeline, store
from jaxlm.errors import UserError


@pytest.fixture(scope="module")
def mixed(prepared, corpus_dir, tmp_path_factory):
    """Rows of two sources (three files and four files of the corpus) weighted 3:1."""
    _, _, tok = prepared
    files = sorted(corpus_dir.glob("*.txt"))
    parts = {}
    for label, group in (("a", files[:3]), ("b", files[3:])):
        directory = tmp_path_factory.mktemp(label)
        texts = [f.read_text() for f in group]
        build.build(iter(texts), tok.tokenizer, tok.bos_id, tok.eos_id, directory, 20_000, 1, label, "tok", label)
        parts[label] = pipeline.TokenRows(store.TokenStore(directory), 32, whole_rows=True)
    return pipeline.MixedRows(parts, [3.0, 1.0])


def source_of(rows, flat):
    return np.searchsorted(rows.offsets, flat, side="right") - 1


def test_sources_are_drawn_by_weight_and_each_runs_through_its_own_epochs(mixed):
    small = int(np.argmin([len(r) for r in mixed.parts.values()]))
    n = 4 * len(mixed)
    order = np.asarray([mixed.order(seed=1)[i] for i in range(n)])
    share = (source_of(mixed, order) == 0).mean()
    assert abs(share - 0.75) < 0.01
    drawn = order[source_of(mixed, order) == small] - mixed.offsets[small]
    size = len(list(mixed.parts.values())[small])
    assert len(drawn) > 2 * size  # the smaller source ran out and started a new epoch
    for epoch in range(2):  # each epoch is a permutation of that source's rows
        assert sorted(drawn[epoch * size:(epoch + 1) * size]) == list(range(size))
    assert not np.array_equal(drawn[:size], drawn[size:2 * size])


def test_mixture_batches_are_the_same_on_any_process_count_and_resume_exactly(mixed):
    one = pipeline.TrainBatches(mixed, 8, seed=2)
    whole = [next(one) for _ in range(6)]
    two = [pipeline.TrainBatches(mixed, 8, seed=2, process_index=i, process_count=2) for i in range(2)]
    for want in whole:
        halves = [next(t) for t in two]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])
    resumed = pipeline.TrainBatches(mixed, 8, seed=2, next_row=3 * 8)
    for want in whole[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_a_mixture_trains_and_reports_each_source(tiny, corpus_dir, tmp_path):
    from jaxlm import train
    files = sorted(corpus_dir.glob("*.txt"))
    mixture = (f"data.mixture=[{{paths: [{files[0]}, {files[1]}], weight: 3, label: first}},"
               f"{{paths: [{files[2]}, {files[3]}], weight: 1}}]")
    args = [a for a in tiny if not a.startswith(("data.source", "data.paths"))]
    train.main(["--workdir", str(tmp_path), *args, mixture, "train.steps=4", "checkpoint.every=4"])
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    last = evals[-1]
    assert {"loss", "first/loss", "source1/loss", "first/perplexity"} <= set(last)
    low, high = sorted([last["first/loss"], last["source1/loss"]])
    assert low <= last["loss"] <= high  # the whole is the sources' token-weighted mean


@pytest.mark.parametrize("extra, message", [
    (["data.paths=[a.txt]"], "leave data.paths, data.eval_paths and data.name empty"),
    (["data.mixture=[{paths: [a.txt], name: lm1b}]"], r"data.mixture\[0\] needs either paths"),
    (["data.mixture=[{paths: [a.txt], weight: 0}]"], r"data.mixture\[0\].weight=0.0 must be positive"),
    (["data.mixture=[{paths: [a.txt], label: x}, {name: x}]"], "labels .* repeat"),
    (["task=mlm", "mlm.nsp=true"], "not task=mlm with mlm.nsp"),
])
def test_mixture_mistakes_are_one_line(extra, message):
    base = ["data.mixture=[{paths: [a.txt]}, {paths: [b.txt]}]"]
    with pytest.raises(UserError, match=message):
        load(None, [*base, *extra] if not extra[0].startswith("data.mixture") else extra)
