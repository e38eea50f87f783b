"""Sequence to sequence: parallel files and rows, the label-smoothed loss, a tiny run that
learns its pairs and translates them, greedy and by beam search."""

import json

import jax
import numpy as np
import pytest
from conftest import records

from jaxlm import config as config_lib
from jaxlm import evaluate, infer, train
from jaxlm.config import DataConfig, ModelConfig, Seq2seqConfig
from jaxlm.data import parallel
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import Splits
from jaxlm.errors import UserError
from jaxlm.metrics import text_scores
from jaxlm.tasks.seq2seq import Seq2seqTask

WORDS = tokenizer_lib.placeholder(64)  # one token a word: w4, w5, ...
PAIRS = [{"source": "w4 w5 w6", "target": "w7 w8"}, {"source": "w9", "target": "w10 w11 w12 w13"}]
MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=64, max_len=16, positions="relative",
                    relative_buckets=8, relative_max_distance=12, norm="rmsnorm", use_bias=False, mlp="geglu",
                    tie_embeddings=False)


def test_rows_shift_the_target_behind_a_start_token():
    rows = parallel.ParallelRows(PAIRS, WORDS, 6, 4, prefix="w20 ")
    row = rows[0]
    assert row["inputs"].tolist() == [20, 4, 5, 6, WORDS.eos_id, 0] and row["input_segments"].tolist() == [1] * 5 + [0]
    assert row["targets_in"].tolist() == [WORDS.bos_id, 7, 8, 0] and row["targets"].tolist() == [7, 8, WORDS.eos_id, 0]
    assert row["target_segments"].tolist() == [1, 1, 1, 0]
    cut = rows[1]  # 4 target tokens + EOS do not fit 4: the end goes, EOS stays
    assert cut["targets"].tolist() == [10, 11, 12, WORDS.eos_id] and cut["targets_in"].tolist() == [WORDS.bos_id, 10, 11, 12]
    assert rows.tokens == 3 + 4


class Unreadable(list):
    """A split that fails when anything reads it."""

    def __iter__(self):
        raise AssertionError("this split was read")

    def __len__(self):
        raise AssertionError("this split was read")


def test_a_split_is_encoded_only_when_read():
    config = config_lib.load(None, ["task=seq2seq", "data.source=parallel", "data.paths=[x.tsv]", "data.seq_len=6",
                                    "seq2seq.target_len=4"])
    rows = Seq2seqTask.rows(config, Splits(Unreadable(), PAIRS, "source", ""), WORDS)
    assert rows["eval"][1]["targets"].tolist() == [10, 11, 12, WORDS.eos_id]  # evaluate reads one split
    assert rows["eval"] is rows["eval"]  # encoded once
    with pytest.raises(AssertionError, match="this split was read"):
        rows["train"]


def test_files_and_their_errors(tmp_path):
    (tmp_path / "train.tsv").write_text("en\tes\nw4 w5\tw6\nw7\tw8 w9\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"en": "w4", "es": "w5"}) + "\n")
    data = DataConfig(source="parallel", paths=[str(tmp_path / "train.tsv")], eval_paths=[str(tmp_path / "dev.jsonl")])
    splits = parallel.load_splits(data, Seq2seqConfig(source_key="en", target_key="es"))
    assert [(e["source"], e["target"]) for e in splits.train] == [("w4 w5", "w6"), ("w7", "w8 w9")]
    with pytest.raises(UserError, match="train.tsv:2: no 'source' column.*seq2seq.source_key"):
        parallel.load_splits(data, Seq2seqConfig())
    with pytest.raises(UserError, match="data.source=parallel .* goes with task=seq2seq"):
        config_lib.load(None, ["task=seq2seq", "data.source=text", "data.paths=[x.txt]"])


def test_tfds_catalog_pairs_by_name(tmp_path):
    """wmt14_translate/de-en (a Translation feature, in TFDS's older layout) and xsum load by
    name; the keys name their features; `evaluate --split test` reads the test split."""
    from conftest import prepare_catalog
    tfds_dir = tmp_path / "tfds"
    pairs = [{"de": f"w{4 + i % 20} w{5 + i % 7}", "en": f"w{30 + i % 11}"} for i in range(30)]
    prepare_catalog("wmt14_translate/de-en", tfds_dir, {"train": pairs[:20], "validation": pairs[20:25],
                                                        "test": pairs[25:]})
    prepare_catalog("xsum", tfds_dir, {"train": [{"document": "w4 w5 w6", "summary": "w4"}] * 3,
                                       "validation": [{"document": "w7 w8", "summary": "w8"}]})
    common = ["task=seq2seq", "data.source=tfds", f"data.tfds_dir={tfds_dir}"]
    config = config_lib.load(None, [*common, "data.name=wmt14_translate/de-en", "seq2seq.source_key=de",
                                    "seq2seq.target_key=en"])
    splits = Seq2seqTask.load_splits(config)  # TFDS stores examples shuffled
    assert sorted((e["source"], e["target"]) for e in splits.train) == sorted((p["de"], p["en"]) for p in pairs[:20])
    assert sorted(e["target"] for e in splits.eval) == sorted(p["en"] for p in pairs[20:25])
    test = Seq2seqTask.load_splits(evaluate.test_config(config))
    assert sorted(e["source"] for e in test.eval) == sorted(p["de"] for p in pairs[25:])
    xsum = Seq2seqTask.load_splits(config_lib.load(None, [*common, "data.name=xsum", "seq2seq.source_key=document",
                                                         "seq2seq.target_key=summary"]))
    assert [e["target"] for e in xsum.eval] == ["w8"] and len(xsum.train) == 3
    with pytest.raises(UserError, match=r"xsum has no feature 'source', 'target' \(it has document, summary\); "
                                        "set seq2seq.source_key"):
        Seq2seqTask.load_splits(config_lib.load(None, [*common, "data.name=xsum"]))


def test_label_smoothing_spreads_the_target_mass_over_the_vocabulary():
    rows = parallel.ParallelRows(PAIRS, WORDS, 8, 6)
    batch = {k: np.stack([rows[i][k] for i in range(2)]) for k in parallel.KEYS}
    plain, smooth = (Seq2seqTask(MODEL, Seq2seqConfig(target_len=6, label_smoothing=e), 60) for e in (0.0, 0.2))
    params = plain.init(jax.random.key(0), batch)["params"]
    _, p = plain.loss(params, batch, jax.random.key(0), train=False)
    _, s = smooth.loss(params, batch, jax.random.key(0), train=False)
    assert float(p["tokens"]) == 8 and float(p["loss_sum"]) == pytest.approx(float(p["nll_sum"]), rel=1e-6)
    logp = np.asarray(jax.nn.log_softmax(plain.logits(params, batch)[..., :plain.vocab], axis=-1))  # the tokenizer's ids
    mask = batch["target_segments"] > 0
    target = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want = (-(0.8 * target + 0.2 * logp.mean(-1)) * mask).sum()
    np.testing.assert_allclose(float(s["loss_sum"]), want, rtol=1e-5)
    assert float(s["nll_sum"]) == pytest.approx(float(p["nll_sum"]), rel=1e-6)


def test_packed_rows_give_the_loss_of_one_pair_a_row():
    """Pairs packed several to a row on both sides (segment ids apart, positions restarting):
    the loss sums are those of one pair a row."""
    from jaxlm.data import packing
    task = Seq2seqTask(MODEL, Seq2seqConfig(target_len=12), 60)
    pairs = [{"source": " ".join(f"w{4 + (i * 7 + j) % 50}" for j in range(1 + i % 4)),
              "target": " ".join(f"w{4 + (i * 5 + j) % 50}" for j in range(1 + (i * 3) % 5))} for i in range(8)]
    rows = parallel.ParallelRows(pairs, WORDS, 12, 12)
    batch = {k: np.stack([rows[i][k] for i in range(8)]) for k in parallel.KEYS}
    packed = packing.Packer(packing.packed_sizes(rows.lengths, rows.capacities, 8), sides=parallel.SIDES)(batch)
    assert packed["inputs"].shape[0] < 8 and packed["target_segments"].max() > 1
    assert (packed["input_segments"].max(1) == packed["target_segments"].max(1)).all()  # the same pairs a row
    params = task.init(jax.random.key(0), batch)["params"]
    _, alone = task.loss(params, batch, jax.random.key(0), train=False)
    _, together = task.loss(params, packed, jax.random.key(0), train=False)
    assert float(together["tokens"]) == float(alone["tokens"]) == rows.tokens
    for key in ("loss_sum", "nll_sum"):
        np.testing.assert_allclose(float(together[key]), float(alone[key]), rtol=1e-5)


def test_a_tiny_run_learns_its_pairs_and_translates_them(tmp_path, capsys):
    pairs = [("the house", "la casa"), ("the dog", "el perro"), ("a red house", "una casa roja"),
             ("the black cat", "el gato negro"), ("good morning", "buenos dias"), ("thank you", "gracias")]
    (tmp_path / "train.tsv").write_text("en\tes\n" + "".join(f"{a}\t{b}\n" for a, b in pairs))
    overrides = ["task=seq2seq", "data.source=parallel", f"data.paths=[{tmp_path}/train.tsv]",
                 f"data.eval_paths=[{tmp_path}/train.tsv]", f"data.cache_dir={tmp_path}/cache", "data.vocab_size=300",
                 "data.seq_len=12", "seq2seq.source_key=en", "seq2seq.target_key=es", "seq2seq.target_len=10",
                 "seq2seq.label_smoothing=0.0", "model.positions=relative", "model.norm=rmsnorm", "model.use_bias=false",
                 "model.num_layers=2", "model.embed_dim=64", "model.num_heads=4", "model.max_len=32",
                 "train.batch_size=32", "train.steps=80", "train.log_every=40", "train.eval_every=80",
                 "train.eval_batches=1", "train.decode_eval_examples=0",
                 "optim.learning_rate=3e-3", "optim.warmup_steps=5", "checkpoint.every=80"]
    final = train.train(config_lib.load(None, overrides), tmp_path / "w")
    assert final["accuracy"] == 1.0, final  # every target token of the pairs
    # throughput counts the rows the steps computed: a step's 32 pairs go into 24 rows (packed
    # two to a row where they fit, in a multiple of the 8 devices), not one a row
    last = records(tmp_path / "w", "train")[80]
    assert last["tokens_per_s"] / last["examples_per_s"] == pytest.approx(12 * 24 / 32)  # seq_len x rows / pairs
    capsys.readouterr()
    for beam in ("1", "3"):
        infer.main(["translate", "--workdir", str(tmp_path / "w"), "--beam-size", beam, "the black cat", "good morning"])
        assert capsys.readouterr().out.splitlines() == ["el gato negro", "buenos dias"]
    # summarize is the same command over a file, with the run's own decoding settings by default
    (tmp_path / "texts.txt").write_text("the dog\nthank you\na red house\n")
    infer.main(["summarize", "--workdir", str(tmp_path / "w"), "--input", str(tmp_path / "texts.txt"), "--batch-size", "2"])
    assert capsys.readouterr().out.splitlines() == ["el perro", "gracias", "una casa roja"]
    # evaluate decodes the whole split and writes the hypotheses its figures come from
    evaluate.main(["--workdir", str(tmp_path / "w"), "--beam-size", "3", "--json"])
    printed = json.loads(capsys.readouterr().out)
    hypotheses = (tmp_path / "w" / "eval" / "hypotheses-eval-80-beam3.txt").read_text().splitlines()
    assert hypotheses == [b for _, b in pairs]
    recomputed = text_scores(hypotheses, [b for _, b in pairs])
    assert all(printed[k] == pytest.approx(v) for k, v in recomputed.items())
    assert printed["chrf"] == pytest.approx(100.0)  # (BLEU is 0: no target has four words)
    evaluate.main(["--workdir", str(tmp_path / "w")])  # the config's beam: its own files, the others kept
    evaluate.main(["--workdir", str(tmp_path / "w"), "--beam-size", "2", "seq2seq.no_repeat_ngram=2"])
    assert sorted(p.name for p in (tmp_path / "w" / "eval").iterdir()) == [
        "hypotheses-eval-80-beam2-norepeat2.txt", "hypotheses-eval-80-beam3.txt", "hypotheses-eval-80.txt",
        "metrics-eval-80-beam2-norepeat2.json", "metrics-eval-80-beam3.json", "metrics-eval-80.json"]
    # the test split is scored whole, though the run scores one batch (32 pairs) of a held-out split:
    # 32 learned pairs, then pairs it never saw
    unseen = [("a green frog", "una rana verde"), ("the old man", "el hombre viejo")]
    (tmp_path / "test.tsv").write_text("en\tes\n" + "".join(f"{a}\t{b}\n" for a, b in (pairs * 6)[:32] + unseen))
    for extra, learned_only in (([], False), (["train.eval_batches=1"], True)):
        evaluate.main(["--workdir", str(tmp_path / "w"), "--split", "test", "--beam-size", "1", "--json",
                       f"data.test_paths=[{tmp_path}/test.tsv]", *extra])
        assert (json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"] == 1.0) == learned_only
    assert len((tmp_path / "w" / "eval" / "hypotheses-test-80-beam1.txt").read_text().splitlines()) == 34


def test_text_scores_are_the_reference_implementations():
    """ROUGE-1 of a hypothesis holding half a reference's words: precision 1, recall 1/2; BLEU
    of an exact copy is 100, of nothing in common 0."""
    scores = text_scores(["the cat sat", "dogs bark"], ["the cat sat on the mat", "cats purr loudly"])
    assert scores["rouge1"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert text_scores(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)
    assert text_scores(["x y z w"], ["a b c d"])["bleu"] == pytest.approx(0.0)
