"""Fine-tuning end to end: import HF weights, train a classifier from them, evaluate, infer."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate, hf, infer, train
from jaxlm.errors import UserError
from jaxlm.models.encoder import Encoder
from jaxlm.workdir import open_run

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imported")
    hf.main(["import", "--hf-dir", str(GOLDEN / "tiny_bert_mlm"), "--workdir", str(workdir)])
    return workdir


@pytest.fixture(scope="module")
def finetuned(imported, tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    for name, n in (("train.tsv", 96), ("test.tsv", 32)):
        lines = ["label\ttext"]
        for _ in range(n):
            words = [f"w{i}" for i in rng.integers(5, 90, rng.integers(2, 9))]
            lines.append(f"{int(int(words[0][1:]) < 45)}\t{' '.join(words)}")
        (root / name).write_text("\n".join(lines) + "\n")
    overrides = ["task=classify", f"init.from_workdir={imported}", "data.source=labeled",
                 f"data.paths=[{root / 'train.tsv'}]", f"data.eval_paths=[{root / 'test.tsv'}]",
                 "data.seq_len=16", "train.batch_size=16", "train.steps=12", "train.log_every=4",
                 "train.eval_every=6", "checkpoint.every=6", "checkpoint.best_metric=accuracy",
                 "optim.learning_rate=1e-3", "optim.warmup_steps=2", "model.dropout=0.0"]
    workdir = tmp_path_factory.mktemp("finetuned")
    final = train.train(config_lib.load(None, overrides), workdir)
    return workdir, final, root


def test_finetuning_starts_from_the_imported_encoder(imported, finetuned):
    workdir, final, _ = finetuned
    assert {"loss", "accuracy", "macro_f1"} <= set(final)
    run, ckpt = open_run(workdir)
    assert run.config.model.num_layers == 2 and run.config.model.embed_dim == 32  # shapes inherited
    source_run, source_ckpt = open_run(imported)
    source, _ = source_ckpt.restore_params(source_run.compiled.abstract_state.params)
    state = run.compiled.init_state(0)  # what train() started from, before its first step
    start = train.initial_params(run, jax.device_get(state.params))
    for a, b in zip(jax.tree_util.tree_leaves(start["encoder"]), jax.tree_util.tree_leaves(source["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = jax.device_get(state.params["encoder"])
    ids = np.array([[2, 10, 11, 12, 3]], np.int32)
    args = (ids, np.zeros_like(ids), np.ones_like(ids), np.arange(5)[None])
    model = Encoder(run.config.model)
    loaded_out = model.apply({"params": start["encoder"]}, *args)[0]
    assert not np.allclose(loaded_out, model.apply({"params": fresh}, *args)[0])  # differs from random init
    np.testing.assert_allclose(loaded_out, model.apply({"params": source["encoder"]}, *args)[0])


@pytest.mark.parametrize("scan", [True, False], ids=["unrolled-to-scanned", "scanned-to-unrolled"])
def test_finetuning_across_scan_layers(imported, finetuned, tmp_path, scan):
    """A pretraining run of one layer layout fine-tunes a model of the other (restacked on load)."""
    source_dir = imported
    if not scan:  # a scanned source: import the same weights with scan_layers=true
        source_dir = tmp_path / "scanned"
        hf.main(["import", "--hf-dir", str(GOLDEN / "tiny_bert_mlm"), "--workdir", str(source_dir),
                 "model.scan_layers=true"])
    workdir, _, _ = finetuned
    config = config_lib.load_workdir(workdir, [f"init.from_workdir={source_dir}", f"model.scan_layers={scan}"])
    run, _ = train.prepare(config, tmp_path / "run")
    state = run.compiled.init_state(0)
    start = jax.device_get(train.initial_params(run, state.params))
    assert ("blocks" in start["encoder"]) == scan
    source_run, source_ckpt = open_run(imported)
    source, _ = source_ckpt.restore_params(source_run.compiled.abstract_state.params)
    ids = np.array([[2, 10, 11, 12, 3]], np.int32)
    args = (ids, np.zeros_like(ids), np.ones_like(ids), np.arange(5)[None])
    want = Encoder(source_run.config.model).apply({"params": source["encoder"]}, *args)[0]
    got = Encoder(run.config.model).apply({"params": start["encoder"]}, *args)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_best_checkpoint_evaluate_and_classify(finetuned, capsys, tmp_path):
    workdir, final, _ = finetuned
    assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()]
    capsys.readouterr()
    evaluate.main(["--workdir", str(workdir), "--json"])
    import json
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == pytest.approx(final["accuracy"]) and 0 <= out["macro_f1"] <= 1
    (tmp_path / "texts.txt").write_text("w1 w2 w3\nw80 w2\n")
    infer.main(["classify", "--workdir", str(workdir), "--input", str(tmp_path / "texts.txt"), "w3 w4"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in ("0", "1") for line in lines)
    assert all(0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)


def test_encoder_inference_compiles_once_per_shape(imported, finetuned, caplog):
    """Batches after the first reuse the compiled function (it is not redefined per call)."""
    import logging

    from jaxlm import encoder_infer
    for workdir, call in ((imported, lambda run, params, texts: encoder_infer.fill_mask(run, params, texts, 3)),
                          (finetuned[0], encoder_infer.classify)):
        run, ckpt = open_run(workdir)
        params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
        texts = ["w1 [MASK] w3", "w4 w5 [MASK] w7"]
        first = call(run, params, texts)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            again = call(run, params, texts)
            call(run, params, ["w9 [MASK]", "[MASK] w2 w3 w4 w5"])  # other texts, same shapes
        assert again == first
        assert not [r for r in caplog.records if "Compiling" in r.getMessage()], caplog.text[:500]


def test_fill_mask_prints_top_k_per_mask(imported, capsys):
    infer.main(["fill-mask", "--workdir", str(imported), "w1 [MASK] w3 [MASK]", "--top-k", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "w1 [MASK] w3 [MASK]" and len(out) == 3
    probs = [float(x) for x in out[1].split()[3::2]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    with pytest.raises(SystemExit) as info:
        infer.main(["fill-mask", "--workdir", str(imported), "no mask here"])
    assert info.value.code == 2 and "no [MASK] in" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs a task=classify run"):
        infer.encoder_command(infer.parse_args(["classify", "--workdir", str(imported), "x"]), ["x"])
