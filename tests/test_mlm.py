"""Masked-LM: masking statistics, whole words, masks keyed by row; the encoder's padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import rngs
from jaxlm.config import MlmConfig, ModelConfig
from jaxlm.data import pipeline
from jaxlm.models.encoder import EncoderClassifier, EncoderMLM
from jaxlm.tasks.mlm import MlmTask

MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=512, max_len=128,
                    positions="learned", activation="gelu")


@pytest.fixture(scope="module")
def real(prepared):
    """A real tokenizer and 256 real rows of 64 tokens."""
    cfg, splits, tok = prepared
    rows = pipeline.TokenRows(pipeline.token_stores(splits, tok, cfg)["train"], 64, whole_rows=True)
    batch = {k: np.stack([rows[r][k] for r in range(256)]) for k in pipeline.KEYS}
    batch["segment_ids"][:8, 40:] = 0  # some padding
    batch["row_ids"] = pipeline.row_ids(np.arange(256))
    return tok, batch


def corrupt(tok, batch, seed=0, train=True, **mlm):
    task = MlmTask(MODEL, MlmConfig(**mlm), 64, seed, tok.special_ids(), tok.continues_word(), tok.mask_id)
    out = jax.jit(task.corrupt, static_argnums=1)({k: jnp.asarray(v) for k, v in batch.items()}, train)
    return task, [np.asarray(x) for x in out]


def test_masking_statistics(real):
    tok, batch = real
    task, (inputs, picked, targets, weights) = corrupt(tok, batch)
    tokens = batch["inputs"]
    special = np.isin(tokens, tok.special_ids()) | (batch["segment_ids"] == 0)
    chosen = np.zeros(tokens.shape, bool)
    rows = np.arange(len(tokens))[:, None].repeat(picked.shape[1], 1)
    chosen[rows[weights > 0], picked[weights > 0]] = True
    assert not (chosen & special).any()  # never a special token or padding
    per_row = chosen.sum(1) / (~special).sum(1)
    assert abs(per_row.mean() - 0.15) < 0.01 and per_row.max() <= 0.15 + 1 / 40
    np.testing.assert_array_equal(np.sort(targets[weights > 0]), np.sort(tokens[chosen]))
    assert (inputs[~chosen] == tokens[~chosen]).all()  # unselected tokens untouched
    masked = (inputs[chosen] == tok.mask_id).mean()
    kept = (inputs[chosen] == tokens[chosen]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.02  # random replacements: the rest
    assert not np.isin(inputs[chosen & (inputs != tok.mask_id)], tok.special_ids()).any()
    assert picked.shape[1] == task.predictions == 10  # ceil(0.15 * 64)


def test_whole_word_masks_cover_whole_words(real):
    tok, batch = real
    _, (inputs, picked, _, weights) = corrupt(tok, batch, whole_word=True)
    chosen = np.zeros(batch["inputs"].shape, bool)
    rows = np.arange(len(chosen))[:, None].repeat(picked.shape[1], 1)
    chosen[rows[weights > 0], picked[weights > 0]] = True
    special = np.isin(batch["inputs"], tok.special_ids()) | (batch["segment_ids"] == 0)
    # a continuation token (not right after a special one) is chosen exactly when the one before is
    inner = tok.continues_word()[batch["inputs"]][:, 1:] & ~special[:, :-1] & ~special[:, 1:]
    assert (chosen[:, 1:][inner] == chosen[:, :-1][inner]).all()
    assert inner.sum() > 1000 and chosen.sum() > 1000  # words of several pieces were there to test
    per_row = chosen.sum(1) / (batch["segment_ids"] != 0).sum(1)
    assert 0.12 < per_row.mean() <= 0.15


def test_masks_follow_the_row_not_the_batch(real):
    tok, batch = real
    _, (a, *_) = corrupt(tok, batch)
    shuffled = {k: v[::-1] for k, v in batch.items()}  # the same rows in another order / place
    _, (b, *_) = corrupt(tok, shuffled)
    np.testing.assert_array_equal(a, b[::-1])
    other = dict(batch, row_ids=pipeline.row_ids(np.arange(256) + 256))  # the same text seen at another position
    _, (c, *_) = corrupt(tok, other)
    assert (a != c).mean() > 0.05


def test_eval_masks_do_not_depend_on_the_training_seed(real):
    tok, batch = real
    picked = {(seed, train): corrupt(tok, batch, seed, train)[1][1] for seed in (1, 2) for train in (True, False)}
    np.testing.assert_array_equal(picked[1, False], picked[2, False])
    assert (picked[1, True] != picked[2, True]).mean() > 0.05


def test_masks_of_rows_past_2_to_the_31_are_new(real):
    tok, batch = real
    rows = np.arange(256) + 5
    _, (a, *_) = corrupt(tok, dict(batch, row_ids=pipeline.row_ids(rows)))
    _, (b, *_) = corrupt(tok, dict(batch, row_ids=pipeline.row_ids(rows + 2**31)))
    _, (c, *_) = corrupt(tok, dict(batch, row_ids=pipeline.row_ids(rows + 2**32)))
    assert (a != b).mean() > 0.05 and (a != c).mean() > 0.05


def test_each_purpose_has_its_own_random_stream():
    """Dropout at step s, the masks of row s and initialisation never share a key."""
    root = jax.random.key(0)
    for s in range(4):
        keys = [rngs.stream(root, rngs.DROPOUT, s), rngs.stream(root, rngs.MASKS, 0, s),
                rngs.stream(root, rngs.INIT)]
        data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
        assert len(data) == len(keys)


def test_encoder_padding_never_changes_real_positions():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 512, (2, 24)), jnp.int32)
    seg = jnp.ones((2, 24), jnp.int32).at[0, 15:].set(0)
    pos, types = jnp.broadcast_to(jnp.arange(24), (2, 24)), jnp.zeros((2, 24), jnp.int32)
    masked = jnp.asarray([[1, 5, 14], [0, 9, 23]], jnp.int32)
    model = EncoderMLM(MODEL)
    params = model.init(jax.random.key(0), ids, types, seg, pos, masked)["params"]
    a, _ = model.apply({"params": params}, ids, types, seg, pos, masked)
    b, _ = model.apply({"params": params}, ids.at[0, 15:].set(7), types, seg, pos, masked)
    np.testing.assert_array_equal(a, b)
    c, _ = model.apply({"params": params}, ids.at[0, 14].set(7), types, seg, pos, masked)
    assert not np.allclose(a[0], c[0])  # a real token does change them
    classifier = EncoderClassifier(MODEL, num_labels=3)
    cparams = classifier.init(jax.random.key(0), ids, types, seg, pos)["params"]
    np.testing.assert_array_equal(classifier.apply({"params": cparams}, ids, types, seg, pos),
                                  classifier.apply({"params": cparams}, ids.at[0, 15:].set(7), types, seg, pos))


def test_nsp_pretraining_end_to_end(tiny, corpus_dir, tmp_path):
    import json

    from jaxlm import config as config_lib
    from jaxlm import train
    held = [str(corpus_dir / "json.txt"), str(corpus_dir / "string.txt")]  # two documents or more
    trained = [str(p) for p in sorted(corpus_dir.glob("*.txt")) if str(p) not in held]
    overrides = [*tiny, "task=mlm", "mlm.nsp=true", "model.positions=learned", "train.steps=4",
                 "train.eval_every=4", "train.log_every=4", "checkpoint.every=4",
                 f"data.paths=[{','.join(trained)}]", f"data.eval_paths=[{','.join(held)}]"]
    final = train.train(config_lib.load(None, overrides), tmp_path)
    assert 0 <= final["nsp_accuracy"] <= 1 and 0 < final["nsp_loss"] < 5 and 0 <= final["accuracy"] <= 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_line = next(r for r in logged if r["kind"] == "train")
    assert {"loss", "nsp_loss", "nsp_accuracy", "grad_norm"} <= set(train_line)
