import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jaxlm import config as config_lib
from jaxlm.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_equal_gpt_tiny_preset():
    assert config_lib.load(str(ROOT / "configs/gpt_tiny.yaml")) == config_lib.load()


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_presets_load(preset):
    config_lib.load(str(ROOT / "configs" / preset))


def test_required_keys_exist():
    keys = config_lib.keys()
    for key in ["seed", "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                "checkpoint.every", "checkpoint.keep", "data.source", "data.paths", "data.seq_len",
                "model.num_layers", "model.embed_dim", "model.num_heads", "optim.learning_rate",
                "optim.schedule", "optim.warmup_steps", "optim.weight_decay"]:
        assert key in keys


def test_overrides_apply_with_types():
    c = config_lib.load(None, ["train.steps=200", "model.num_layers=3", "data.paths=[a.txt,b.txt]",
                               "optim.learning_rate=1e-4"])
    assert (c.train.steps, c.model.num_layers, c.data.paths) == (200, 3, ["a.txt", "b.txt"])
    assert c.optim.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("override,expected", [
    ("train.step=10", "did you mean 'train.steps'"),
    ("modle.num_layers=2", "did you mean 'model.num_layers'"),
    ("train.steps=-5", "train.steps=-5 must be a positive integer"),
    ("model.num_heads=5", "model.num_heads=5 does not divide model.embed_dim=128"),
    ("optim.schedule=cosyne", "optim.schedule='cosyne' is not one of"),
    ("train.steps=ten", "bad value for 'train.steps'"),
    ("data.source=text", "data.source=text needs data.paths"),
    ("data.seq_len=4096", "exceeds model.max_len"),
    ("steps", "is not key=value"),
    ("model.dtype=float16", "use model.dtype=bfloat16"),
    ("data.prefetch=-1", "data.prefetch=-1 must be >= 0"),
    ("model.logits_chunk=48", "model.logits_chunk=48 does not divide data.seq_len=128"),
    ("train.profile_steps=[5]", "train.profile_steps=[5] must be [first, last]"),
    ("train.peak_tflops=-1", "train.peak_tflops=-1.0 must be >= 0"),
    ("model.copy_attention=true", "model.copy_attention copies from an encoder-decoder's source"),
])
def test_bad_input_is_one_clear_error(override, expected):
    with pytest.raises(UserError, match=None) as info:
        config_lib.load(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_run_shorter_than_its_warmup_is_accepted():
    """`python -m jaxlm.train train.steps=20` (default warmup 30) is a smoke test, not an error."""
    assert config_lib.load(None, ["train.steps=20"]).optim.warmup_steps == 30


def test_missing_and_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="config file 'nope.yaml' not found"):
        config_lib.load("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match="did you mean 'train.steps'"):
        config_lib.load(str(bad))


def test_cli_exits_2_with_one_line(capsys):
    from jaxlm.train import main
    with pytest.raises(SystemExit) as info:
        main(["train.steps=-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.steps=-1 must be a positive integer"]


def test_save_and_reload_round_trip(tmp_path):
    c = config_lib.load(None, ["model.num_layers=3", "data.paths=[x.txt]", "data.source=text"])
    config_lib.save(c, tmp_path / "config.yaml")
    assert config_lib.load_workdir(tmp_path) == c
    changed = dataclasses.replace(c, seed=4)
    assert config_lib.diff(c, changed) == ["seed"]
    assert OmegaConf.load(tmp_path / "config.yaml").model.num_layers == 3
    # texts that look like interpolations (a chat template may hold them) come back as they were
    for text in ("${model.num_layers}", "\\${x}", "a\\b {{ bos_token }}", "${"):
        templated = dataclasses.replace(c, sft=dataclasses.replace(c.sft, chat_template=text))
        config_lib.save(templated, tmp_path / "config.yaml")
        assert config_lib.load_workdir(tmp_path).sft.chat_template == text


# ----- hostile input: any key, any value, any YAML shape is a Config or one line naming it -----

import string  # noqa: E402

import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = config_lib.keys()
SCALARS = st.one_of(st.integers(-10**12, 10**12), st.floats(), st.booleans(), st.none(),
                    st.text(string.printable, max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=6), inner,
                                                 max_size=3)), max_leaves=6)
ONE_LINE = string.printable.translate(str.maketrans("", "", "\n\r\x0b\x0c"))
HOSTILE = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


def accepted_or_one_line(call) -> str | None:
    """Runs `call`; a refusal must be a `UserError` of one line (any other exception fails)."""
    try:
        call()
    except UserError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return str(e)
    return None


@HOSTILE
@given(key=st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "._", min_size=1, max_size=20)),
       value=st.one_of(st.text(ONE_LINE, max_size=20),
                       VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6)
                                  .strip().removesuffix("...").strip())))
def test_any_override_is_accepted_or_refused_naming_it(key, value):
    error = accepted_or_one_line(lambda: config_lib.load(None, [f"{key}={value}"]))
    if error is not None and "is not key=value" not in error:
        assert key.split(".")[0] in error or "=" in error, error


@HOSTILE
@given(doc=st.one_of(
    VALUES,  # any shape at the top: a list, a scalar, a mapping of anything
    st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in KEYS}) + ["bogus"]), VALUES, max_size=3),
    st.dictionaries(st.sampled_from(sorted(config_lib.SECTIONS)),  # the right sections, any leaves
                    st.dictionaries(st.sampled_from(sorted({k.split(".")[-1] for k in KEYS})), VALUES, max_size=2),
                    max_size=2)))
def test_any_yaml_file_is_accepted_or_refused_in_one_line(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    accepted_or_one_line(lambda: config_lib.load(str(path)))


def test_a_yaml_file_that_is_not_a_mapping_says_so(tmp_path):
    (tmp_path / "list.yaml").write_text("- train\n- steps\n")
    with pytest.raises(UserError, match="holds a list, not a mapping of sections"):
        config_lib.load(str(tmp_path / "list.yaml"))
    with pytest.raises(UserError, match="override 'mlm=0': 'mlm' is a section, not a value; set its keys, e.g. mlm.<key>="):
        config_lib.load(None, ["mlm=0"])
