"""GPT-2, Llama, Mistral and Qwen2 weights from Hugging Face: logits and greedy generation equal
transformers' (golden fixtures made by tests/golden/make_hf_golden.py); export then import is
unchanged; an imported chat template renders conversations as transformers does."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm import decoding, hf, infer
from jaxlm.errors import UserError
from jaxlm.workdir import open_run

GOLDEN = Path(__file__).resolve().parent / "golden"
# golden model -> the architecture its export writes (Mistral's, within its window, is Llama's)
MODELS = {"tiny_gpt2": "GPT2LMHeadModel", "tiny_llama": "LlamaForCausalLM", "tiny_mistral": "LlamaForCausalLM",
          "tiny_qwen2": "Qwen2ForCausalLM"}


def imported(hf_dir: Path, workdir: Path, *overrides: str):
    hf.main(["import", "--hf-dir", str(hf_dir), "--workdir", str(workdir), *overrides])
    run, ckpt = open_run(workdir)
    params, step = ckpt.restore_params(run.compiled.abstract_state.params)
    assert step == 0 and run.config.task == "clm"
    return run, params


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    """Each golden model imported once: name -> workdir."""
    root = tmp_path_factory.mktemp("imported")
    for name in MODELS:
        imported(GOLDEN / name, root / name)
    return {name: root / name for name in MODELS}


def restored(workdir: Path):
    run, ckpt = open_run(workdir)
    return run, ckpt.restore_params(run.compiled.abstract_state.params)[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_greedy_generation_match_transformers(name, workdirs):
    golden = np.load(GOLDEN / name / "logits.npz")
    run, params = restored(workdirs[name])
    model, vocab = run.task.model, golden["logits"].shape[-1]
    logits = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, jnp.asarray(golden["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits)[..., :vocab], golden["logits"], atol=1e-4)

    prompts = jnp.asarray(golden["prompts"], jnp.int32)  # [3, 6], generated 32 tokens each, greedy
    shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((3, 38), jnp.int32), decode=True))["cache"]
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    out = jax.jit(lambda p, c: decoding.generate(
        infer.cached_logits(model, p, vocab), c, prompts, jnp.ones_like(prompts), jax.random.key(0),
        max_new_tokens=32, eos_id=-1, pad_id=0, temperature=0.0))(params, cache)
    np.testing.assert_array_equal(np.asarray(out), golden["greedy"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_the_cross_entropy_of_transformers_logits(name, workdirs):
    """The training loss of an imported model is transformers' cross-entropy: the table's padding
    rows (jaxlm rounds the vocabulary up; they hold zeros) take no part in the softmax."""
    golden = np.load(GOLDEN / name / "logits.npz")
    run, params = restored(workdirs[name])
    vocab = golden["logits"].shape[-1]
    assert run.config.model.vocab_size > vocab  # padded: the case this tests
    ids = golden["input_ids"].astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones_like(ids[:, 1:]),
             "positions": np.broadcast_to(np.arange(ids.shape[1] - 1, dtype=np.int32), ids[:, 1:].shape)}
    batch = {k: np.pad(v, ((0, 8 - len(v)), (0, 0))) for k, v in batch.items()}  # empty rows: one a device
    with run.compiled.context():
        sums = run.compiled.eval_step(params, run.compiled.put_batch(batch))
    logp = jax.nn.log_softmax(golden["logits"][:, :-1].astype(np.float64), -1)
    want = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1).mean()
    np.testing.assert_allclose(float(sums["loss_sum"]) / float(sums["tokens"]), want, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_then_import_gives_the_same_tensors(name, workdirs, tmp_path):
    hf.main(["export", "--workdir", str(workdirs[name]), "--hf-dir", str(tmp_path / "out")])
    want, got = load_file(str(GOLDEN / name / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    import json
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [MODELS[name]]
    imported(tmp_path / "out", tmp_path / "again")  # what export writes imports again


def test_layout_specifics_are_imported(workdirs):
    """Mistral's sliding window caps model.max_len (the golden sequences fit inside it); Qwen2's
    query/key/value projections carry their biases, its output projection none."""
    assert open_run(workdirs["tiny_mistral"])[0].config.model.max_len == 48
    run, params = restored(workdirs["tiny_qwen2"])
    assert run.config.model.qkv_bias and not run.config.model.use_bias
    attention = params["block_0"]["attention"]
    assert attention["key"]["bias"].shape == (2, 8) and "bias" not in attention["out"]
    assert np.abs(np.asarray(attention["query"]["bias"])).max() > 0


def test_an_imported_chat_template_renders_as_transformers_does(workdirs):
    from jaxlm.data import chat
    golden = np.load(GOLDEN / "tiny_qwen2" / "chat.npz")
    run, _ = open_run(workdirs["tiny_qwen2"])
    template = run.config.sft.chat_template
    assert template.startswith("{% for message in messages %}")  # from tokenizer_config.json
    conversations = [
        [{"role": "user", "content": "w5 w6 w7"}],
        [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"},
         {"role": "assistant", "content": "w12 w13 w14"}, {"role": "user", "content": "w15"}]]
    for conversation, text, ids in zip(conversations, golden["texts"], golden["ids"]):
        assert chat.render(template, conversation, run.tokenizer, add_generation_prompt=True) == str(text)
        assert chat.prompt_ids(template, conversation, run.tokenizer) == [i for i in ids.tolist() if i >= 0]
    assert run.tokenizer.tokenizer.token_to_id("<|im_end|>") in run.tokenizer.end_ids


def test_sharded_weights_export_and_import(workdirs, tmp_path, monkeypatch):
    """Above the shard size, export writes shards and their index (as save_pretrained does);
    import reads them back tensor by tensor to the same model."""
    from jaxlm.hf import files
    _, params = restored(workdirs["tiny_llama"])
    monkeypatch.setattr(files, "SHARD_BYTES", 8_000)
    hf.main(["export", "--workdir", str(workdirs["tiny_llama"]), "--hf-dir", str(tmp_path / "sharded")])
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    _, again = imported(tmp_path / "sharded", tmp_path / "again")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(UserError, match=f"{shards[1]}' is named by model.safetensors.index.json but missing"):
        hf.import_hf(tmp_path / "sharded", tmp_path / "x", [])


def test_a_decoder_checkpoint_of_another_shape_is_named(tmp_path):
    import shutil

    from safetensors.numpy import save_file
    broken = Path(shutil.copytree(GOLDEN / "tiny_llama", tmp_path / "broken"))
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # 4 KV heads, not 2
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match="lacks 1 tensor.*layers.0.mlp.up_proj.weight"):
        hf.import_hf(broken, tmp_path / "a", [])
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"k_proj.weight \(32, 32\) vs block_1/attention/key/kernel \(32, 2, 8\)"):
        hf.import_hf(broken, tmp_path / "b", [])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_import_holds_one_parameter_at_a_time_in_host_memory(tmp_path, scanned):
    """A Llama of 4 layers (45 MB of weights, fsdp over 8 devices) is placed parameter by
    parameter: no tensor read from the files is still alive when the one after the next is
    read (counted by weak references; reading every tensor first would keep all 39 alive), and
    the placed parameters (unrolled or scanned) equal the tensors written."""
    import dataclasses
    import json
    import weakref
    from collections.abc import Mapping

    from jaxlm import config as config_lib
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.hf import decoders, files
    from jaxlm.models.layers import restack
    from jaxlm.workdir import build

    class Counted(Mapping):
        """The weight files, counting the tensors read from them that are still alive."""

        def __init__(self, inner):
            self.inner, self.alive, self.most = inner, 0, 0

        def __getitem__(self, name):
            tensor = self.inner[name]
            self.alive += 1
            self.most = max(self.most, self.alive)
            weakref.finalize(tensor, self._gone)
            return tensor

        def _gone(self):
            self.alive -= 1

        def __iter__(self):
            return iter(self.inner)

        def __len__(self):
            return len(self.inner)

    tok = tokenizer_lib.from_file(GOLDEN / "tiny_llama" / "tokenizer.json")
    config = config_lib.load(None, ["mesh.fsdp=8", "mesh.data=1", f"model.scan_layers={str(scanned).lower()}"])
    model = decoders.model_config(json.loads((GOLDEN / "tiny_llama" / "config.json").read_text()), config.model)
    model = dataclasses.replace(model, embed_dim=512, num_heads=8, num_kv_heads=2, mlp_dim=1408, num_layers=4)
    run = build(dataclasses.replace(config, model=model), tok, mode="jit")
    written = decoders.from_params(restack(jax.device_get(run.compiled.init_state(1).params), scanned=False),
                                   "llama", model, tok.vocab_size)
    files.write(tmp_path, written)
    state = run.compiled.init_state(2)  # other values, to be replaced
    weights = Counted(files.Weights(tmp_path))
    params, unused = decoders.place_params(weights, "llama", model, state.params, "x")
    assert len(written) == 39 and weights.most <= 2, weights.most
    assert unused == [] and params["token_embed"]["embedding"].sharding == state.params["token_embed"]["embedding"].sharding
    again = decoders.from_params(restack(jax.device_get(params), scanned=False), "llama", model, tok.vocab_size)
    for name, w in written.items():
        np.testing.assert_array_equal(again[name], w)


def test_an_imported_decoder_fine_tunes_with_the_settings_given_at_import(corpus_dir, tmp_path, capsys):
    """`train --workdir W` with no --config continues with W's saved config (here the import's)."""
    from jaxlm import train
    imported(GOLDEN / "tiny_gpt2", tmp_path / "w", "data.source=text", f"data.paths=[{corpus_dir}/*.txt]",
             f"data.cache_dir={tmp_path}/cache", "data.seq_len=32", "train.batch_size=8", "train.steps=2",
             "train.eval_every=2", "train.eval_batches=1")
    capsys.readouterr()
    train.main(["--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "resumed from step 0" in err and "done in" in err
    _, ckpt = open_run(tmp_path / "w")
    assert ckpt.latest_step() == 2
