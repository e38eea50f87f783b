"""Hugging Face weights in and out, through safetensors (never pickle): BERT here, GPT-2, Llama,
Mistral and Qwen2 in `decoders`, the weight files (single or sharded) in `files`.

    python -m jaxlm.hf import --hf-dir DIR --workdir W [key=value ...]
    python -m jaxlm.hf export --workdir W --hf-dir DIR [--step N] [--merge-lora]

`import` turns a `BertModel`, `BertForMaskedLM`, `BertForPreTraining`,
`BertForSequenceClassification`, `BertForQuestionAnswering`, `GPT2LMHeadModel`,
`LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM` directory (config.json,
model.safetensors or its shards, and tokenizer.json or vocab.txt; a decoder's chat template)
into a jaxlm workdir: the resolved config, the tokenizer and a step-0 checkpoint.
`train`, `evaluate` and `infer` accept it, and a fine-tuning run initialises its encoder from
it (`init.from_workdir=W`). `export` writes a masked-LM run as `BertForMaskedLM` (with
next-sentence prediction: `BertForPreTraining`), a classification run as
`BertForSequenceClassification`, a question-answering run as `BertForQuestionAnswering` and a
decoder as `GPT2LMHeadModel`, `LlamaForCausalLM` or `Qwen2ForCausalLM` (by its layout), that
`from_pretrained` loads;
a run with LoRA adapters exports with `--merge-lora`, the adapters folded into the weights.

This package is the only place that knows Hugging Face names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers import decoders as token_decoders

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpoints
from jaxlm.config import DECODER_TASKS, Config, ModelConfig
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError, cli
from jaxlm.hf import decoders, files, place, t5
from jaxlm.models import layers
from jaxlm.models.layers import padded_vocab, restack
from jaxlm.workdir import build, open_run

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def model_config(hf: dict, base: ModelConfig) -> ModelConfig:
    """A jaxlm ModelConfig with the shapes and numerics of a Hugging Face BERT config.json."""
    if hf.get("model_type") != "bert":
        raise UserError(f"model_type '{hf.get('model_type')}' is not supported; jaxlm imports BERT models")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"hidden_act '{act}' is not supported; use one of {', '.join(ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError("only absolute position embeddings are supported")
    return dataclasses.replace(
        base, num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        vocab_size=padded_vocab(hf["vocab_size"], base.vocab_multiple),
        max_len=hf["max_position_embeddings"], positions="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), activation=ACTIVATIONS[act],
        type_vocab_size=hf.get("type_vocab_size", 2), use_bias=True,
        dropout=hf.get("hidden_dropout_prob", 0.1))


Convert = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
SAME: Convert = (np.asarray, np.asarray)
LINEAR: Convert = (lambda w: w.T, lambda k: k.T)  # torch Linear [out, in] <-> kernel [in, out]


def _rows(padded: int, real: int) -> Convert:
    """The vocabulary axis padded to the jaxlm table size, and cut back for HF."""
    return (lambda w: np.pad(w, [(0, padded - w.shape[0])] + [(0, 0)] * (w.ndim - 1)),
            lambda w: w[:real])


Mapping = dict[str, tuple[tuple[str, ...], Convert]]


def encoder_mapping(cfg: ModelConfig, prefix: str, vocab: int) -> Mapping:
    """HF tensor name -> (path in the jaxlm encoder subtree, conversions both ways).

    `vocab` is the HF vocabulary size (the jaxlm table may be padded beyond it).
    """
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    qkv: Convert = (lambda w: w.T.reshape(-1, heads, head_dim), lambda k: k.reshape(k.shape[0], -1).T)
    qkv_bias: Convert = (lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(-1))
    out_proj: Convert = (lambda w: w.T.reshape(heads, head_dim, -1), lambda k: k.reshape(-1, k.shape[-1]).T)
    e = prefix + "embeddings."
    out: Mapping = {
        e + "word_embeddings.weight": (("token_embed", "embedding"), _rows(cfg.vocab_size, vocab)),
        e + "position_embeddings.weight": (("position_embed", "embedding"), SAME),
        e + "token_type_embeddings.weight": (("type_embed", "embedding"), SAME),
        e + "LayerNorm.weight": (("ln_embed", "LayerNorm_0", "scale"), SAME),
        e + "LayerNorm.bias": (("ln_embed", "LayerNorm_0", "bias"), SAME),
        prefix + "pooler.dense.weight": (("pooler", "kernel"), LINEAR),
        prefix + "pooler.dense.bias": (("pooler", "bias"), SAME),
    }
    for i in range(cfg.num_layers):
        h, b = f"{prefix}encoder.layer.{i}.", f"block_{i}"
        for name in ("query", "key", "value"):
            out[f"{h}attention.self.{name}.weight"] = ((b, "attention", name, "kernel"), qkv)
            out[f"{h}attention.self.{name}.bias"] = ((b, "attention", name, "bias"), qkv_bias)
        out[f"{h}attention.output.dense.weight"] = ((b, "attention", "out", "kernel"), out_proj)
        out[f"{h}attention.output.dense.bias"] = ((b, "attention", "out", "bias"), SAME)
        out[f"{h}attention.output.LayerNorm.weight"] = ((b, "ln_attention", "LayerNorm_0", "scale"), SAME)
        out[f"{h}attention.output.LayerNorm.bias"] = ((b, "ln_attention", "LayerNorm_0", "bias"), SAME)
        out[f"{h}intermediate.dense.weight"] = ((b, "mlp", "wi", "kernel"), LINEAR)
        out[f"{h}intermediate.dense.bias"] = ((b, "mlp", "wi", "bias"), SAME)
        out[f"{h}output.dense.weight"] = ((b, "mlp", "wo", "kernel"), LINEAR)
        out[f"{h}output.dense.bias"] = ((b, "mlp", "wo", "bias"), SAME)
        out[f"{h}output.LayerNorm.weight"] = ((b, "ln_mlp", "LayerNorm_0", "scale"), SAME)
        out[f"{h}output.LayerNorm.bias"] = ((b, "ln_mlp", "LayerNorm_0", "bias"), SAME)
    return out


def head_mapping(cfg: ModelConfig, vocab: int) -> Mapping:
    """HF names of the heads beside `encoder`: masked-LM (decoder tied), NSP, the classifier and
    the span head."""
    p = "cls.predictions."
    return {
        p + "transform.dense.weight": (("mlm_transform", "kernel"), LINEAR),
        p + "transform.dense.bias": (("mlm_transform", "bias"), SAME),
        p + "transform.LayerNorm.weight": (("mlm_ln", "LayerNorm_0", "scale"), SAME),
        p + "transform.LayerNorm.bias": (("mlm_ln", "LayerNorm_0", "bias"), SAME),
        p + "bias": (("mlm_bias",), _rows(cfg.vocab_size, vocab)),
        "cls.seq_relationship.weight": (("nsp", "kernel"), LINEAR),  # BertForPreTraining's NSP head
        "cls.seq_relationship.bias": (("nsp", "bias"), SAME),
        "classifier.weight": (("classifier", "kernel"), LINEAR),
        "classifier.bias": (("classifier", "bias"), SAME),
        "qa_outputs.weight": (("qa_outputs", "kernel"), LINEAR),  # BertForQuestionAnswering's span head
        "qa_outputs.bias": (("qa_outputs", "bias"), SAME),
    }


def mapping_for(cfg: ModelConfig, params: dict, prefix: str, vocab: int) -> Mapping:
    """Every HF name that maps onto these params (heads only where the model has them)."""
    out = {k: (("encoder", *p), c) for k, (p, c) in encoder_mapping(cfg, prefix, vocab).items()}
    out.update({k: v for k, v in head_mapping(cfg, vocab).items() if _get(params, v[0]) is not None})
    return out


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _prefix(tensors: dict[str, np.ndarray]) -> str:
    return "bert." if any(k.startswith("bert.") for k in tensors) else ""


def to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, target: dict, source: str,
              vocab: int) -> dict:
    """Fills a copy of `target` (the jaxlm params, numpy) with the HF tensors that map onto it.

    The encoder must be complete; heads the checkpoint lacks (a fresh classifier, the MLM head
    of a `BertModel`) keep their values from `target`. Shape mismatches and missing encoder
    tensors are one error naming them.
    """
    mapping = mapping_for(cfg, target, _prefix(tensors), vocab)
    params = jax.tree_util.tree_map(np.asarray, target)
    missing = [k for k, (p, _) in mapping.items() if k not in tensors and p[0] == "encoder"
               and not k.endswith(("pooler.dense.weight", "pooler.dense.bias"))]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} encoder tensor(s), e.g. {', '.join(missing[:3])}; "
                        "is it a BERT checkpoint of this config?")
    wrong = []
    for name, (path, (convert, _)) in mapping.items():
        if name not in tensors:
            continue
        value = convert(np.asarray(tensors[name], np.float32))
        want = _get(params, path)
        if want is None or value.shape != np.shape(want):
            wrong.append(f"{name} {tuple(value.shape)} vs {'/'.join(path)} "
                         f"{None if want is None else tuple(np.shape(want))}")
            continue
        _set(params, path, value)
    if wrong:
        raise UserError(f"{source}: {len(wrong)} tensor(s) do not fit the model: {'; '.join(wrong[:3])}")
    unused = sorted(set(tensors) - set(mapping) - {"cls.predictions.decoder.bias"})  # that one is tied
    if unused:
        print(f"note: {len(unused)} tensor(s) of {source} are not part of this model and were left out, e.g. "
              f"{', '.join(unused[:3])}", file=sys.stderr)
    return params


def from_params(params: dict, cfg: ModelConfig, vocab: int) -> dict[str, np.ndarray]:
    """HF tensors (`bert.`-prefixed, as BertFor* models name them) of jaxlm params."""
    out = {}
    for name, (path, (_, convert)) in mapping_for(cfg, params, "bert.", vocab).items():
        out[name] = np.ascontiguousarray(convert(np.asarray(_get(params, path), np.float32)))
    if "cls.predictions.bias" in out:  # transformers ties these two to one tensor
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def load_tokenizer(hf_dir: Path) -> tokenizer_lib.TextTokenizer:
    """The directory's tokenizer.json, or a BERT WordPiece tokenizer built from vocab.txt."""
    if (hf_dir / "tokenizer.json").is_file():
        return tokenizer_lib.from_file(hf_dir / "tokenizer.json")
    vocab_file = hf_dir / "vocab.txt"
    if not vocab_file.is_file():
        raise UserError(f"'{hf_dir}' has neither tokenizer.json nor vocab.txt")
    settings = {}
    if (hf_dir / "tokenizer_config.json").is_file():
        settings = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=settings.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = token_decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    # a private temporary file: never in hf_dir, which other imports may be reading at once
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tok.save(str(path))
        return tokenizer_lib.from_file(path)


ARCHITECTURES = {  # what an imported architecture trains as
    "BertModel": ["task=mlm"], "BertForMaskedLM": ["task=mlm"], "BertForPreTraining": ["task=mlm", "mlm.nsp=true"],
    "BertForSequenceClassification": ["task=classify", "data.source=none"],
    "BertForQuestionAnswering": ["task=qa", "data.source=none"],
}
REQUIRED = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings")


def read_hf_dir(hf_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A Hugging Face directory's config.json and safetensors weights, checked; never pickle."""
    if not files.present(hf_dir):
        pickled = [name for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if (hf_dir / name).is_file()]
        if pickled:
            raise UserError(f"'{hf_dir}' holds only {pickled[0]}, which jaxlm does not read (pickle-based formats can run "
                            "code); convert it once with transformers: from_pretrained(...).save_pretrained(dir, "
                            "safe_serialization=True)")
        raise UserError(f"'{hf_dir}' has no model.safetensors; give a Hugging Face model directory saved with "
                        "safetensors (save_pretrained(..., safe_serialization=True))")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"'{hf_dir}' has no config.json; give the whole directory save_pretrained wrote")
    try:
        hf = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"'{hf_dir / 'config.json'}' is not JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(hf, dict):
        raise UserError(f"'{hf_dir / 'config.json'}' is not a JSON object")
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in ARCHITECTURES and arch not in decoders.ARCHITECTURES and arch not in t5.ARCHITECTURES:
        raise UserError(f"architecture {arch} is not supported; jaxlm imports "
                        f"{', '.join([*ARCHITECTURES, *decoders.ARCHITECTURES, *t5.ARCHITECTURES])}")
    required = decoders.REQUIRED[decoders.ARCHITECTURES[arch]] if arch in decoders.ARCHITECTURES else REQUIRED
    required = t5.REQUIRED if arch in t5.ARCHITECTURES else required
    missing = [key for key in required if key not in hf]
    if missing:
        raise UserError(f"'{hf_dir / 'config.json'}' lacks {', '.join(missing)}; is it the config.json of a {arch}?")
    tensors = files.Weights(hf_dir)
    return hf, tensors


def import_hf(hf_dir: Path, workdir: Path, overrides: list[str]) -> Config:
    """Writes a jaxlm workdir (config, tokenizer, step-0 checkpoint) from a HF BERT directory.

    Everything is read and checked before anything is written, and `config.yaml` comes last:
    a failed import leaves no workdir a later `train` would take for an imported one."""
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise UserError(f"'{workdir}' already holds checkpoints; import into a new --workdir")
    hf, tensors = read_hf_dir(hf_dir)
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch in decoders.ARCHITECTURES:
        return import_decoder(hf_dir, workdir, overrides, hf, tensors)
    if arch in t5.ARCHITECTURES:
        return import_t5(hf_dir, workdir, overrides, hf, tensors)
    defaults = ARCHITECTURES[arch]
    if arch == "BertForSequenceClassification":
        defaults = defaults + [f"classify.num_labels={len(hf.get('id2label', {})) or 2}"]
    config = config_lib.load(None, [*defaults, *overrides])
    if config.task not in ("mlm", "classify", "qa"):
        raise UserError(f"task={config.task} cannot start from a BERT checkpoint; use task=mlm, classify or qa")
    model = model_config(hf, config.model)
    data = dataclasses.replace(config.data, seq_len=min(config.data.seq_len, model.max_len))
    config = dataclasses.replace(config, model=model, data=data)
    config_lib.validate(config)
    tok = load_tokenizer(hf_dir)
    run = build(config, tok, mode="jit")
    c = run.compiled
    state = c.init_state(config.seed)
    target = restack(jax.device_get(state.params), scanned=False)  # HF names follow unrolled layers
    params = to_params(tensors, config.model, target, str(hf_dir), hf["vocab_size"])
    params = restack(params, config.model.scan_layers)
    return _write_import(workdir, run, state, params, tok, hf_dir, arch)


def import_decoder(hf_dir: Path, workdir: Path, overrides: list[str], hf: dict, tensors: dict) -> Config:
    """`import_hf` of a GPT-2 or Llama directory: a `task=clm` workdir (or `task=sft`, given)."""
    kind = decoders.ARCHITECTURES[hf["architectures"][0]]
    config = config_lib.load(None, ["task=clm", *overrides])
    if not config.sft.chat_template:
        config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, chat_template=chat_template(hf_dir)))
    if config.task not in DECODER_TASKS:
        raise UserError(f"task={config.task} cannot start from a {kind} checkpoint; use task=clm or task=sft")
    model = decoders.model_config(hf, config.model)
    data = dataclasses.replace(config.data, seq_len=min(config.data.seq_len, model.max_len))
    config = dataclasses.replace(config, model=model, data=data)
    config_lib.validate(config)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"'{hf_dir}' has no tokenizer.json; save the tokenizer beside the model "
                        "(tokenizer.save_pretrained(dir))")
    tok = load_tokenizer(hf_dir)
    run = build(config, tok, mode="jit")
    state = run.compiled.init_state(config.seed)  # on the devices, sharded; its weights replaced one by one
    params, unused = decoders.place_params(tensors, kind, config.model, state.params, str(hf_dir))
    if unused:
        print(f"note: {len(unused)} tensor(s) of {hf_dir} are not part of this model and "
              f"were left out, e.g. {', '.join(unused[:3])}", file=sys.stderr)
    return _write_import(workdir, run, state, params, tok, hf_dir, kind)


def import_t5(hf_dir: Path, workdir: Path, overrides: list[str], hf: dict, tensors: dict) -> Config:
    """`import_hf` of a T5 directory: a `task=seq2seq` workdir, its weights placed a parameter at a time."""
    config = config_lib.load(None, ["task=seq2seq", "data.source=none", *overrides])
    if config.task != "seq2seq":
        raise UserError(f"task={config.task} cannot start from a T5 checkpoint; use task=seq2seq")
    config = dataclasses.replace(config, model=t5.model_config(hf, config.model))
    config_lib.validate(config)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"'{hf_dir}' has no tokenizer.json; save the tokenizer beside the model "
                        "(tokenizer.save_pretrained(dir))")
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):  # T5 reads one table
        if name in tensors and not np.array_equal(tensors[name], tensors["shared.weight"]):
            raise UserError(f"{hf_dir}: {name} differs from shared.weight; jaxlm's encoder-decoder reads one "
                            "token table for the source and the target")
    tok = load_tokenizer(hf_dir)
    run = build(config, tok, mode="jit")
    state = run.compiled.init_state(config.seed)
    tied = {"lm_head.weight"} if config.model.tie_embeddings else set()
    params, unused = place.place_params(tensors, t5.names(config.model), lambda n, w: t5.to_jaxlm(n, w, config.model),
                                        state.params, str(hf_dir), "T5",
                                        tied=tied | {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"})
    if unused:
        print(f"note: {len(unused)} tensor(s) of {hf_dir} are not part of this model and "
              f"were left out, e.g. {', '.join(unused[:3])}", file=sys.stderr)
    return _write_import(workdir, run, state, params, tok, hf_dir, "t5")


def chat_template(hf_dir: Path) -> str:
    """The directory's chat template (`chat_template.jinja`, or `tokenizer_config.json`'s
    `chat_template`: the text, or the one named "default" of a list); empty if it has none."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    path = hf_dir / "tokenizer_config.json"
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else ""


def _write_import(workdir: Path, run, state, params: dict, tok, hf_dir: Path, arch: str) -> Config:
    """The imported workdir: a step-0 checkpoint, then the tokenizer, then config.yaml (last: it
    marks the workdir complete)."""
    c, config = run.compiled, run.config
    state = state.replace(params=jax.device_put(params, c.state_sharding.params))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
    ckpt.save(0, c.saveable(state), {"next_row": 0}, {"step": 0, "imported_from": str(hf_dir), "architecture": arch})
    ckpt.close()
    tok.save(workdir / "tokenizer.json")
    config_lib.save(config, workdir / "config.yaml")
    return config


def export_decoder(run, params: dict, hf_dir: Path) -> str:
    """`export_hf` of a decoder run as GPT2LMHeadModel or LlamaForCausalLM."""
    m, tok = run.config.model, run.tokenizer
    kind = decoders.kind_of(m)
    tensors = decoders.from_params(params, kind, m, tok.vocab_size)
    hf = decoders.hf_config(kind, m, tok.vocab_size, tok.bos_id, tok.eos_id)
    _write_export(hf_dir, tensors, hf, tok)
    names = tok.tokenizer.id_to_token
    settings = {"bos_token": names(tok.bos_id), "eos_token": names(tok.eos_id), "pad_token": names(tok.pad_id),
                "chat_template": run.config.sft.chat_template or None}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in settings.items() if v}, indent=2) + "\n")
    return hf["architectures"][0]


def _write_export(hf_dir: Path, tensors: dict, hf: dict, tok) -> None:
    hf_dir.mkdir(parents=True, exist_ok=True)
    files.write(hf_dir, tensors)
    (hf_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(hf_dir / "tokenizer.json")


def export_hf(workdir: Path, hf_dir: Path, step: int | None = None, merge_lora: bool = False) -> str:
    """Writes a transformers directory (config.json, model.safetensors, tokenizer.json) of an
    encoder or decoder run; returns the architecture written. A run with LoRA adapters exports
    only with `merge_lora`: the adapters folded into the weights they adapt."""
    run, ckpt = open_run(workdir)
    cfg, m = run.config, run.config.model
    if cfg.task not in (*DECODER_TASKS, "mlm", "classify", "qa", "seq2seq"):
        raise UserError(f"'{workdir}' trains task={cfg.task}, which has no Hugging Face architecture")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, step)
    params = restack(jax.device_get(params), scanned=False)  # HF names follow unrolled layers
    if m.lora_rank:
        if not merge_lora:
            raise UserError(f"'{workdir}' trains LoRA adapters (model.lora_rank={m.lora_rank}); pass --merge-lora "
                            "to export the adapted model as plain weights")
        params, m = layers.merge_lora(params, m), dataclasses.replace(m, lora_rank=0)
        run = dataclasses.replace(run, config=dataclasses.replace(cfg, model=m))
    if cfg.task == "seq2seq":
        t5.check_layout(m)
        tok = run.tokenizer
        _write_export(hf_dir, t5.from_params(params, m, tok.vocab_size),
                      t5.hf_config(m, tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id), tok)
        print(f"exported step {step} of {workdir} as T5ForConditionalGeneration to {hf_dir}", file=sys.stderr)
        return "T5ForConditionalGeneration"
    if cfg.task in DECODER_TASKS:
        arch = export_decoder(run, params, hf_dir)
        print(f"exported step {step} of {workdir} as {arch} to {hf_dir}", file=sys.stderr)
        return arch
    if m.positions != "learned" or m.norm != "layernorm" or not m.use_bias:
        raise UserError("BERT needs learned positions, LayerNorm and biases; this model differs")
    vocab = run.tokenizer.vocab_size
    tensors = from_params(params, m, vocab)
    arch = {"classify": "BertForSequenceClassification", "qa": "BertForQuestionAnswering"}.get(
        cfg.task, "BertForPreTraining" if cfg.mlm.nsp else "BertForMaskedLM")
    if arch in ("BertForMaskedLM", "BertForQuestionAnswering"):  # they have no pooler
        tensors = {k: v for k, v in tensors.items() if not k.startswith("bert.pooler.")}
    hf = {"architectures": [arch], "model_type": "bert", "vocab_size": vocab, "hidden_size": m.embed_dim,
          "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
          "intermediate_size": m.mlp_dim or 4 * m.embed_dim,
          "hidden_act": {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[m.activation],
          "max_position_embeddings": m.max_len, "type_vocab_size": m.type_vocab_size,
          "layer_norm_eps": m.norm_eps, "hidden_dropout_prob": m.dropout,
          "attention_probs_dropout_prob": 0.0, "pad_token_id": run.tokenizer.pad_id,
          "position_embedding_type": "absolute"}
    if cfg.task == "classify":
        names = cfg.classify.labels or [str(i) for i in range(cfg.classify.num_labels)]
        hf["id2label"] = dict(enumerate(names))
        hf["label2id"] = {n: i for i, n in enumerate(names)}
    _write_export(hf_dir, tensors, hf, run.tokenizer)
    print(f"exported step {step} of {workdir} as {arch} to {hf_dir}", file=sys.stderr)
    return arch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Hugging Face BERT, GPT-2 or Llama directory -> a jaxlm workdir")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and model.safetensors")
    imp.add_argument("--workdir", required=True, help="new jaxlm workdir")
    imp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the workdir")
    exp = sub.add_parser("export", help="a jaxlm workdir (encoder or decoder) -> a transformers directory")
    exp.add_argument("--workdir", required=True, help="a training run's directory")
    exp.add_argument("--hf-dir", required=True, help="directory to write")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    exp.add_argument("--merge-lora", action="store_true",
                     help="fold LoRA adapters into the weights they adapt (a run with adapters needs it)")
    return parser.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "import":
        config = import_hf(Path(args.hf_dir), Path(args.workdir), args.overrides)
        m = config.model
        print(f"imported {args.hf_dir} into {args.workdir}: task={config.task}, {m.num_layers} layers, "
              f"width {m.embed_dim}, vocabulary {m.vocab_size}", file=sys.stderr)
    else:
        export_hf(Path(args.workdir), Path(args.hf_dir), args.step, args.merge_lora)


if __name__ == "__main__":
    main()
