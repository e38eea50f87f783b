"""Classification: labeled files, packing equivalence, errors that name the file and line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ClassifyConfig, DataConfig, ModelConfig
from jaxlm.data import labeled
from jaxlm.errors import UserError
from jaxlm.tasks.classify import ClassifyTask

MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=512, max_len=64,
                    positions="learned", activation="gelu")


@pytest.fixture(scope="module")
def examples(prepared):
    _, splits, tok = prepared
    texts = [splits.train[i]["text"].decode()[j:j + 10 + 6 * (i % 9)]
             for i in range(len(splits.train)) for j in range(0, 2000, 97)][:64]
    rows = labeled.ExampleRows([{"text": t, "label": k % 3} for k, t in enumerate(texts)], tok, 32)
    return tok, rows


def test_packed_rows_give_each_example_its_unpacked_logits(examples):
    tok, rows = examples
    batch = {k: np.stack([rows[i][k] for i in range(16)]) for k in labeled.KEYS}
    batch["labels"][3] = -1  # a padding example counts nowhere
    one_a_row = labeled.Packer(())(batch)
    packed = labeled.Packer(rows.packed_rows(16))(batch)
    assert packed["inputs"].shape[0] < 16 and (packed["segment_ids"].max(1) > 1).any()
    task = ClassifyTask(MODEL, 3)
    params = task.init(jax.random.key(0), {k: jnp.asarray(v) for k, v in one_a_row.items()})["params"]
    want = task.logits(params, one_a_row)
    got = task.logits(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _, sums_a = task.loss(params, one_a_row, jax.random.key(0), train=False)
    _, sums_b = task.loss(params, packed, jax.random.key(0), train=False)
    assert float(sums_a["examples"]) == 15 == float(sums_b["examples"])
    np.testing.assert_allclose(float(sums_b["loss_sum"]), float(sums_a["loss_sum"]), rtol=1e-5)
    # a batch that does not fit the packed rows falls back to one example a row
    assert labeled.Packer((1,))(batch)["inputs"].shape[0] == 16


def test_text_pairs_get_token_types_and_truncation(examples):
    tok, _ = examples
    rows = labeled.ExampleRows([{"text": "one two three " * 20, "pair": "four five", "label": 0}], tok, 16)
    row = rows[0]
    ids = row["inputs"][: rows.lengths[0]].tolist()
    assert len(ids) == 16 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(tok.eos_id) == 2 and row["token_types"][ids.index(tok.eos_id) + 1:16].all()


def test_labeled_files_and_their_errors(tmp_path):
    data = DataConfig(source="labeled", paths=[str(tmp_path / "train.tsv")], eval_paths=[str(tmp_path / "test.jsonl")])
    (tmp_path / "train.tsv").write_text("label\ttext\n1\tgood film\n0\tbad film\n")
    (tmp_path / "test.jsonl").write_text('{"label": 1, "text": "fine"}\n')
    splits = labeled.load_splits(data, ClassifyConfig())
    assert [e["label"] for e in splits.train] == [1, 0] and splits.eval[0]["text"] == "fine"
    named = ClassifyConfig(labels=["neg", "pos"])
    (tmp_path / "train.tsv").write_text("label\ttext\npos\tgood film\nmeh\tbad film\n")
    with pytest.raises(UserError, match=r"train.tsv:3: label 'meh' is not one of classify.labels"):
        labeled.load_splits(data, named)
    (tmp_path / "train.tsv").write_text("label\ttext\n1\tgood\n7\tbad\n")
    with pytest.raises(UserError, match=r"train.tsv:3: label 7 is outside 0..1"):
        labeled.load_splits(data, ClassifyConfig())
    (tmp_path / "train.tsv").write_text("label\tsentence\n1\tgood\n")
    with pytest.raises(UserError, match=r"train.tsv:2: no 'text' column"):
        labeled.load_splits(data, ClassifyConfig())
    (tmp_path / "train.tsv").write_text("label\ttext\n")
    with pytest.raises(UserError, match="holds no examples"):
        labeled.load_splits(data, ClassifyConfig())
