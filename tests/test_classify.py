"""Classification: labeled files, packing equivalence, errors that name the file and line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ClassifyConfig, DataConfig, ModelConfig
from jaxlm.data import labeled, packing
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.microbatch import Layout
from jaxlm.tasks.classify import ClassifyTask

MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=512, max_len=64,
                    positions="learned", activation="gelu")


@pytest.fixture(scope="module")
def examples(prepared):
    _, splits, tok = prepared
    joined = " ".join(splits.texts("train"))
    texts = [joined[j:j + 8 + 2 * (k // 21)] for k, j in enumerate(range(0, 64 * 97, 97))]  # 8 to 14 characters
    rows = labeled.ExampleRows([{"text": t, "label": k % 3} for k, t in enumerate(texts)], tok, 32)
    return tok, rows


def test_packed_rows_give_each_example_its_unpacked_logits(examples):
    tok, rows = examples
    batch = {k: np.stack([rows[i][k] for i in range(16)]) for k in labeled.KEYS}
    batch["labels"][3] = -1  # a padding example counts nowhere
    one_a_row = packing.Packer(())(batch)
    packed = packing.Packer(packing.packed_sizes(rows.lengths, rows.seq_len, 16))(batch)
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
    assert packing.Packer((1,))(batch)["inputs"].shape[0] == 16


def test_packing_in_groups_keeps_each_group_whole(examples):
    # 2 pmap devices x 2 microbatches: the step slices device blocks, then rows/examples i::2
    tok, rows = examples
    batch = {k: np.stack([rows[i][k] for i in range(32)]) for k in labeled.KEYS}
    packer = packing.Packer(packing.packed_sizes(rows.lengths, rows.seq_len, 8, groups=4), Layout(blocks=2, microbatches=2))
    packed = packer(batch)
    total = packed["inputs"].shape[0]
    assert total < 32 and total % 4 == 0
    task = ClassifyTask(MODEL, 3)
    one_a_row = packing.Packer(())(batch)
    params = task.init(jax.random.key(0), {k: jnp.asarray(v) for k, v in one_a_row.items()})["params"]
    want = np.asarray(task.logits(params, one_a_row))
    seen = []
    for block in range(2):
        block_rows = {k: v[block * total // 2:(block + 1) * total // 2] for k, v in packed.items()
                      if k not in ("pool_at", "labels")}
        for i in range(2):
            group = block * 16 + np.arange(i, 16, 2)  # the examples this microbatch holds
            sub = {k: v[i::2] for k, v in block_rows.items()}
            sub.update(pool_at=packed["pool_at"][group], labels=packed["labels"][group])
            assert (sub["pool_at"] < sub["inputs"].size).all()
            np.testing.assert_allclose(task.logits(params, sub), want[group], rtol=1e-5, atol=1e-6)
            seen.extend(group)
    assert sorted(seen) == list(range(32))


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
    (tmp_path / "train.tsv").write_bytes("label\ttext\n1\tcaf\u00e9\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(UserError, match=r"train.tsv' is not valid UTF-8 \(byte 16: b'\\xe9'\).*encoding_errors=replace"):
        labeled.load_splits(data, ClassifyConfig())
    (tmp_path / "test.jsonl").write_text('{"label": 1, "text": "fine"}\n[1, "text"]\n')
    (tmp_path / "train.tsv").write_text("label\ttext\n1\tgood\n")
    with pytest.raises(UserError, match=r"test.jsonl:2: not a JSON object \(a list\)"):
        labeled.load_splits(data, ClassifyConfig())
    (tmp_path / "test.jsonl").write_text('{"label": 1, "text": "fine"}\n')
    long = "word " * 400_000  # a 2 MB field: beyond the csv module's default limit, cut to seq_len later
    (tmp_path / "train.tsv").write_text(f"label\ttext\textra\n1\t{long}\tx\n0\tbad\n")
    assert [len(e["text"]) for e in labeled.load_splits(data, ClassifyConfig()).train] == [len(long), 3]


def test_a_long_text_is_cut_before_tokenizing_into_the_same_row(prepared):
    """Rows of long texts (cut at a space before tokenizing) equal rows of the texts tokenized
    whole; a text of long words (no space within the cut) is tokenized whole."""
    _, splits, tok = prepared
    joined = " ".join(splits.texts("train"))
    texts = [joined[:50_000], joined[1000:1100], "x" * 5000 + " tail", "é" * 3000]
    rows = labeled.ExampleRows([{"text": t, "label": 0} for t in texts], tok, 32)
    for i, text in enumerate(texts):
        want = [tok.bos_id, *tok.encode(text)[:30], tok.eos_id]
        np.testing.assert_array_equal(rows[i]["inputs"][:len(want)], want)
        assert rows.lengths[i] == len(want)
    # one token a word: 40 tokens of 60 characters each pass the cut's 1,024 characters at the
    # 17th, so the text is tokenized whole
    words = tokenizer_lib.placeholder(64)
    wide = " ".join(["w5" + " " * 58] * 40)
    assert [len(ids) for ids in labeled.encode_first(words, [" ".join(["w5"] * 40), wide], 30)] == [40, 40]


def test_tfds_catalog_datasets_by_name(tmp_path):
    from conftest import prepare_catalog

    from jaxlm import config as config_lib
    from jaxlm import train
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(5, 90, rng.integers(2, 9))) for _ in range(60)]
    labels = [int(int(t.split()[0][1:]) < 45) for t in texts]
    tfds_dir = tmp_path / "tfds"
    prepare_catalog("glue/sst2", tfds_dir, {
        "train": [{"sentence": t, "label": y, "idx": i} for i, (t, y) in enumerate(zip(texts[:40], labels))],
        "validation": [{"sentence": t, "label": y, "idx": i} for i, (t, y) in enumerate(zip(texts[40:], labels[40:]))],
        "test": [{"sentence": t, "label": -1, "idx": i} for i, t in enumerate(texts[40:])]})
    prepare_catalog("imdb_reviews/plain_text", tfds_dir, {
        "train": [{"text": t, "label": y} for t, y in zip(texts[:50], labels)],
        "test": [{"text": t, "label": y} for t, y in zip(texts[50:], labels[50:])]})
    common = ["task=classify", "data.source=tfds", f"data.tfds_dir={tfds_dir}", f"data.cache_dir={tmp_path}",
              "data.vocab_size=300", "data.seq_len=16", "model.num_layers=1", "model.embed_dim=16",
              "model.num_heads=2", "model.positions=learned", "train.batch_size=8"]

    run, rows = train.prepare(config_lib.load(None, [*common, "data.name=glue/sst2"]), tmp_path / "sst2")
    assert run.config.classify.labels == ["negative", "positive"]  # names from the ClassLabel
    assert config_lib.load_workdir(tmp_path / "sst2").classify.labels == ["negative", "positive"]
    assert (len(rows["train"]), len(rows["eval"])) == (40, 20)  # eval: the validation split
    splits = labeled.load_catalog(run.config.data, run.config.classify)  # TFDS stores examples shuffled
    assert sorted((e["text"], e["label"]) for e in splits.train) == sorted(zip(texts[:40], labels[:40]))
    assert sorted(e["text"] for e in splits.eval) == sorted(texts[40:])
    first = rows["train"][0]
    assert run.tokenizer.decode(first["inputs"][1:rows["train"].lengths[0] - 1].tolist()) == splits.train[0]["text"]

    run, rows = train.prepare(config_lib.load(None, [*common, "data.name=imdb_reviews"]), tmp_path / "imdb")
    assert run.config.classify.labels == ["neg", "pos"]
    assert (len(rows["train"]), len(rows["eval"])) == (50, 10)  # no validation split: test
    assert sorted(rows["eval"].labels.tolist()) == sorted(labels[50:])

    def fails(overrides, match):
        with pytest.raises(UserError, match=match):
            train.prepare(config_lib.load(None, [*common, *overrides]), tmp_path / "bad")
    fails(["data.name=glue/sst2", "data.eval_split=test"], "split 'test' is unlabeled .* data.eval_split=validation")
    fails(["data.name=glue/mnli"], r"has 3 labels \(entailment, neutral, contradiction\) but classify.num_labels=2")
    fails(["data.name=glue/stsb"], "no class-label feature 'label'")
    fails(["data.name=glue/sst2", "classify.labels=[bad,good]"], "differ from glue/sst2's labels")
    fails(["data.name=imdb_reviews", "data.text_key=review", "classify.pair_key=summary"],
          "name the text with data.text_key")


def test_classifier_training_agrees_under_accumulation_and_pmap(examples):
    from jaxlm import optim, sharding
    from jaxlm.config import MeshConfig, OptimConfig
    from jaxlm.steps import Compiled, PmapCompiled
    _, rows = examples
    batches = [{k: np.stack([rows[i][k] for i in range(start, start + 32)]) for k in labeled.KEYS}
               for start in (0, 32)]
    batches[0]["labels"][5] = -1  # a padding example
    tx = optim.optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"), 10)

    def losses(mesh_cfg, accum):
        task = ClassifyTask(MODEL, 3)
        if mesh_cfg.mode == "pmap":
            c, blocks, multiple = PmapCompiled(task, tx, 32, 32, accum), 8, 1
        else:
            mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor])
            c, blocks, multiple = Compiled(task, tx, mesh, sharding.rules(mesh_cfg), 32, 32, accum), 1, 2
        groups = blocks * accum
        packer = packing.Packer(packing.packed_sizes(rows.lengths, rows.seq_len, 32 // groups, multiple, groups), Layout(blocks, accum))
        state, out = c.init_state(0), []
        with c.context():
            for step in range(3):
                packed = packer(batches[step % 2])
                assert packed["inputs"].shape[0] < 32  # really packed
                state, m = c.train_step(state, c.put_batch(packed), jax.random.key(0))
                out.append(task.summarize(m)["loss"])
        return out

    reference = losses(MeshConfig(data=1), 1)  # one device, one batch
    np.testing.assert_allclose(losses(MeshConfig(data=2, fsdp=2, tensor=2), 4), reference, rtol=1e-5)
    np.testing.assert_allclose(losses(MeshConfig(mode="pmap"), 2), reference, rtol=1e-5)
