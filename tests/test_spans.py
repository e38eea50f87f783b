"""T5's span corruption: sources and targets reassemble the original tokens, the noise has the
asked density and mean span, the draws are keyed by seed and row, and a tiny run trains."""

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.data import spans

SENTINEL, EOS = 1000, 2


def reassemble(source: np.ndarray, target: np.ndarray) -> list[int]:
    """The tokens a source and its target stand for: each sentinel replaced by its span."""
    restored, spans_of = [], {}
    current = None
    for t in target[:-1].tolist():  # without the final EOS
        if t >= SENTINEL:
            current = spans_of.setdefault(t, [])
        else:
            current.append(t)
    for t in source[:-1].tolist():
        restored += spans_of[t] if t >= SENTINEL else [t]
    return restored


def test_sources_and_targets_reassemble_the_original():
    rng = np.random.default_rng(0)
    for length in (2, 3, 10, 57, 200):
        tokens = rng.integers(3, 900, length)
        mask = spans.noise_mask(length, 0.15, 3.0, rng)
        source, target = spans.corrupt(tokens, mask, SENTINEL, EOS)
        assert source[-1] == EOS and target[-1] == EOS and target[0] == SENTINEL
        assert reassemble(source, target) == tokens.tolist()
        sentinels = source[source >= SENTINEL]
        assert sentinels.tolist() == list(range(SENTINEL, SENTINEL + len(sentinels)))  # in order, each once


def test_noise_density_and_mean_span():
    rng = np.random.default_rng(1)
    mask = spans.noise_mask(1000, 0.15, 3.0, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.sum() == 150 and starts.sum() == 50 and not mask[0]  # round(150 / 3) spans, a gap first
    lengths = [spans.noise_mask(1000, 0.15, 3.0, rng) for _ in range(2)]
    assert not np.array_equal(*lengths)  # the spans move with the draw


class Rows:
    """Language-model rows of 32 tokens: a packed row of two documents, then a short one."""
    seq_len = 32

    def __len__(self):
        return 2

    def __getitem__(self, r):
        tokens = np.arange(100, 132) if r == 0 else np.concatenate([np.arange(200, 210), np.zeros(22, int)])
        segments = np.concatenate([np.ones(20), np.full(12, 2)]) if r == 0 else (tokens > 0)
        return {"inputs": tokens, "segment_ids": segments.astype(np.int32)}


def test_rows_are_keyed_by_seed_and_row_and_fit_both_sides():
    a, b, c = (spans.SpanRows(Rows(), seed, 0.15, 3.0, SENTINEL, 1, EOS, target_len=8) for seed in (0, 0, 1))
    assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])  # the same seed and row: the same spans
    assert any(not np.array_equal(a[r]["inputs"], c[r]["inputs"]) for r in range(2))  # another seed: others
    for r in range(2):
        tokens, source, target = a.pair(r)
        assert reassemble(source, target) == tokens.tolist() and len(target) <= 8 and len(source) <= 32
        row = a[r]
        assert row["targets_in"][0] == 1 and row["targets_in"][1:len(target)].tolist() == target[:-1].tolist()
    assert a.pair(0)[0].tolist()[:5] == [100, 101, 102, 103, 104]


@pytest.mark.slow
def test_a_tiny_span_corruption_run_trains(corpus_dir, cache_dir, tmp_path):
    from conftest import tiny_overrides
    overrides = [o for o in tiny_overrides(corpus_dir, cache_dir) if not o.startswith("model.")]
    overrides += ["task=span_corruption", "model.positions=relative", "model.norm=rmsnorm", "model.use_bias=false",
                  "model.num_layers=2", "model.embed_dim=32", "model.num_heads=4", "seq2seq.target_len=16",
                  "train.steps=30", "train.eval_every=30", "optim.learning_rate=3e-3"]
    final = train.train(config_lib.load(None, overrides), tmp_path / "w")
    assert final["loss"] < 6.0, final  # from ln(vocab) ~ 6.3 at the start


@pytest.mark.parametrize("setting", ["seq2seq.noise_density=0", "data.source=parallel"])
def test_bad_settings_are_one_line(setting):
    from jaxlm.errors import UserError
    with pytest.raises(UserError, match="task=span_corruption"):
        config_lib.load(None, ["task=span_corruption", setting])
