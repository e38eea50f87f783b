"""T5 weights from Hugging Face (v1.0 and v1.1 layouts): logits and greedy decoding equal
transformers' (golden fixtures made by tests/golden/make_hf_golden.py); export then import is
unchanged."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm import decoding, hf
from jaxlm.models.encoder_decoder import cached_logits, decoding_cache
from jaxlm.workdir import open_run

GOLDEN = Path(__file__).resolve().parent / "golden"
MODELS = ("tiny_t5", "tiny_t5_v1_1")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """Each golden model imported once, when a test first asks for it: name -> workdir."""
    root, done = tmp_path_factory.mktemp("t5"), {}

    def workdir(name: str) -> Path:
        if name not in done:
            hf.main(["import", "--hf-dir", str(GOLDEN / name), "--workdir", str(root / name)])
            done[name] = root / name
        return done[name]
    return workdir


# v1.1 (gated GELU, untied, heads narrower than width / heads) by default; v1.0 with -m slow
NAMES = [pytest.param(MODELS[0], marks=pytest.mark.slow), MODELS[1]]


def restored(workdir: Path):
    run, ckpt = open_run(workdir)
    return run, ckpt.restore_params(run.compiled.abstract_state.params)[0]


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_decoding_match_transformers(name, workdirs):
    golden = np.load(GOLDEN / name / "logits.npz")
    run, params = restored(workdirs(name))
    assert run.config.task == "seq2seq" and run.tokenizer.bos_id == 0  # T5's decoder starts from <pad>
    model, vocab = run.task.model, golden["logits"].shape[-1]
    ids, mask, targets = (jnp.asarray(golden[k]) for k in ("input_ids", "attention_mask", "decoder_input_ids"))
    positions = lambda x: jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)  # noqa: E731
    logits = jax.jit(model.apply)({"params": params}, ids, mask, positions(ids), targets, jnp.ones_like(targets),
                                  positions(targets))
    np.testing.assert_allclose(np.asarray(logits)[..., :vocab], golden["logits"], atol=1e-4)

    sources = jnp.asarray(golden["sources"])  # [3, 7], decoded 32 tokens each, end token masked as transformers did

    def greedy(params):
        cache = decoding_cache(model, params, sources, jnp.ones_like(sources), positions(sources), 33)
        step = cached_logits(model, params, vocab)

        def no_end(tokens, segments, pos, cache):
            out, cache = step(tokens, segments, pos, cache)
            return out.at[..., 1].set(-jnp.inf), cache
        start = jnp.zeros((3, 1), jnp.int32)
        return decoding.generate(no_end, cache, start, jnp.ones_like(start), jax.random.key(0), max_new_tokens=32,
                                 eos_id=-1, pad_id=0, temperature=0.0)

    np.testing.assert_array_equal(np.asarray(jax.jit(greedy)(params)), golden["greedy"])


@pytest.mark.parametrize("name", NAMES)
def test_export_then_import_gives_the_same_tensors(name, workdirs, tmp_path):
    hf.main(["export", "--workdir", str(workdirs(name)), "--hf-dir", str(tmp_path / "out")])
    want, got = load_file(str(GOLDEN / name / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(k for k in want if not k.endswith("embed_tokens.weight"))
    for key in got:
        np.testing.assert_array_equal(got[key], want[key])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert config["feed_forward_proj"] == ("gated-gelu" if name.endswith("v1_1") else "relu")
    hf.main(["import", "--hf-dir", str(tmp_path / "out"), "--workdir", str(tmp_path / "again")])
