"""The typed config tree: dataclasses, YAML presets and `key=value` overrides, validated.

`load(config_file, overrides)` builds a `Config` from the dataclass defaults (which equal
`configs/gpt_tiny.yaml`), then the YAML file, then the overrides, and validates the result.
Every mistake a user can make here raises `UserError` with one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from jaxlm.errors import UserError

SCHEDULES = ("linear", "cosine", "rsqrt", "constant", "wsd")
SOURCES = ("builtin", "text", "tfds", "labeled", "squad", "prompts", "parallel", "none")
TASKS = ("clm", "mlm", "classify", "qa", "sft", "seq2seq", "span_corruption")
ENCODER_DECODER_TASKS = ("seq2seq", "span_corruption")
DECODER_TASKS = ("clm", "sft")  # the tasks of a decoder-only language model
POSITIONS = ("rotary", "learned", "relative", "sinusoidal")  # relative (T5 buckets), sinusoidal: encoder-decoders
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn", "chunked", "auto")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
MLPS = ("plain", "swiglu", "geglu")
INITS = ("normal", "normal_flat", "fan_in", "xavier")
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wi_gate", "wo")  # attention and MLP projections
ROPE_SCALINGS = ("none", "llama3")
REMAT = ("none", "full", "save_dots", "save_dots_no_batch")


@dataclass(unsafe_hash=True)  # hashable so a model can be a static argument of jax.jit
class ModelConfig:
    """Shapes and numerics of the network. A model receives only this; treat it as immutable."""

    num_layers: int = 2
    embed_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # key/value heads (grouped-query attention; each serves num_heads / num_kv_heads queries); 0: num_heads
    head_dim: int = 0  # size of each attention head; 0: embed_dim / num_heads (T5's may differ)
    mlp: str = "plain"  # plain: wo(act(wi x)); swiglu: wo(silu(wi_gate x) * wi x), as Llama; geglu: gelu_tanh gate (T5 v1.1)
    mlp_dim: int = 0  # 0 means 4 * embed_dim
    vocab_size: int = 0  # 0 means the tokenizer's size, rounded up to vocab_multiple
    vocab_multiple: int = 128  # the table's rows, to shard; its padding rows take no part in the softmax
    max_len: int = 1024  # longest sequence (learned positions table, KV cache bound)
    positions: str = "rotary"  # rotary | learned; encoder-decoders also relative (T5's buckets) | sinusoidal (2017)
    relative_buckets: int = 32  # positions=relative: buckets of query-key distance (half each way in an encoder)
    relative_max_distance: int = 128  # positions=relative: distances from here on share the last bucket
    decoder_layers: int = 0  # encoder-decoders: the decoder's blocks; 0: num_layers
    copy_attention: bool = False  # encoder-decoders: mix the output with an attention over source ids (pointer-generator)
    prenorm: bool = True  # encoder-decoders: norm before each sublayer (T5); false: after the residual sum (2017)
    scale_attention: bool = True  # attention scores divided by sqrt(head_dim); T5 folds that into its weights
    scale_embeddings: bool = False  # token embeddings times sqrt(embed_dim) (the 2017 Transformer)
    tied_output_scale: bool = False  # hidden states times embed_dim ** -0.5 before a tied output layer (T5)
    init: str = "normal"  # kernels: normal (0.02, residual outputs / sqrt(2 layers): GPT-2, BERT), normal_flat (0.02, the token table too: BART, Marian), fan_in (T5), xavier (2017)
    rope_base: float = 10000.0
    rope_scaling: str = "none"  # llama3: Llama 3.1's long-context rescaling of the rotary frequencies
    rope_factor: float = 8.0  # rope_scaling=llama3: how much longer than rope_original_max_len
    rope_low_freq_factor: float = 1.0  # rope_scaling=llama3: wavelengths above original/low are divided by factor
    rope_high_freq_factor: float = 4.0  # rope_scaling=llama3: wavelengths below original/high are kept
    rope_original_max_len: int = 8192  # rope_scaling=llama3: the context the frequencies were trained for
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # MLP nonlinearity: gelu_tanh (GPT-2), gelu (exact erf; BERT), relu
    type_vocab_size: int = 2  # encoders: token-type (sentence A/B) embeddings
    use_bias: bool = True
    qkv_bias: bool = False  # biases on the query/key/value projections even without use_bias (Qwen2)
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_impl: str = "auto"  # xla | cudnn | chunked | auto (cuDNN on GPUs with bfloat16 and head dims <= 128, chunked on one CPU, else XLA)
    remat: str = "none"  # recompute activations in the backward pass: none, full, save_dots, ...
    scan_layers: bool = False  # one compiled block under nn.scan (faster compiles for deep models)
    logits_chunk: int = 0  # decoders: row positions whose output logits the loss computes at a time; 0: whole rows
    lora_rank: int = 0  # > 0: low-rank adapters on the lora_targets projections train, every other weight is frozen
    lora_alpha: float = 16.0  # adapters' output scale is lora_alpha / lora_rank
    lora_targets: str = "query,key,value,out,wi,wi_gate,wo"  # projections that get adapters (comma-separated)

    @property
    def head_size(self) -> int:
        """Each attention head's size."""
        return self.head_dim or self.embed_dim // self.num_heads


@dataclass
class MixtureSource:
    """One source of a data mixture (`data.mixture`): text files or a TFDS catalog dataset."""

    paths: list[str] = field(default_factory=list)  # text files or globs
    eval_paths: list[str] = field(default_factory=list)  # held-out files; empty: a hashed share of paths
    name: str = ""  # a TFDS catalog dataset, instead of paths
    weight: float = 1.0  # share of training rows, relative to the other sources
    label: str = ""  # names the source's eval metrics (<label>/loss); empty: the dataset name or source<i>


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token batches."""

    source: str = "builtin"  # builtin | text | tfds | labeled | squad | none (a workdir for inference only)
    paths: list[str] = field(default_factory=list)
    eval_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)  # files read only by `evaluate --split test`
    name: str = ""  # TFDS catalog name, for source=tfds
    tfds_dir: str = ""  # where catalog datasets are kept; empty: $TFDS_DATA_DIR, else <cache_dir>/tfds
    text_key: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"
    eval_fraction: float = 0.02  # held-out share of documents when no eval split exists
    seq_len: int = 128
    tokenizer: str = ""  # a tokenizer.json to load; empty trains a byte-level BPE
    vocab_size: int = 1024  # size of the trained tokenizer
    encoding_errors: str = "strict"  # or "replace": undecodable bytes become U+FFFD
    tokenizer_sample_mb: float = 512.0  # at most this much text (millions of characters) trains the BPE; 0: all
    cache_dir: str = ""  # token stores, tokenizers, catalog datasets; empty: $JAXLM_CACHE or ~/.cache/jaxlm
    shard_mb: float = 16.0  # text per token-store shard (millions of characters); changes the store, not the rows
    prepare_workers: int = 0  # processes that tokenize a token store; 0: one per CPU core
    prepare_runner: str = ""  # empty: local worker processes; else an Apache Beam runner (DirectRunner, DataflowRunner...)
    beam_options: list[str] = field(default_factory=list)  # Beam pipeline options, e.g. ["--project=p", "--region=r"]
    mixture: list[MixtureSource] = field(default_factory=list)  # several sources by weight, instead of source/paths/name
    prefetch: int = 2  # host batches read ahead in background threads (0: none); bounds host memory


@dataclass
class MlmConfig:
    """Masked-LM pretraining (task=mlm): which tokens are predicted."""

    mask_rate: float = 0.15  # share of non-special tokens selected in each row
    whole_word: bool = False  # select all pieces of a word together
    nsp: bool = False  # also next-sentence prediction: rows are [CLS] A [SEP] B [SEP] pairs, half of them B from another document


@dataclass
class ClassifyConfig:
    """Sequence classification (task=classify) over labeled examples."""

    num_labels: int = 2
    labels: list[str] = field(default_factory=list)  # label names in id order; empty: the file holds ids
    label_key: str = "label"  # column / field with the label
    pair_key: str = ""  # optional second text column (sentence pairs)


@dataclass
class QAConfig:
    """Extractive question answering (task=qa): a span of a context answers a question."""

    doc_stride: int = 128  # tokens a context window shares with the one before (Hugging Face's doc_stride)
    max_question_tokens: int = 64  # longer questions are cut
    max_answer_tokens: int = 30  # longest span predicted
    n_best: int = 20  # start and end candidates tried per window
    null_answers: bool = False  # SQuAD 2.0: some questions have no answer in their context
    null_threshold: float = 0.0  # with null_answers: answer "" when [CLS] outscores the best span by more than this


@dataclass
class SftConfig:
    """Supervised fine-tuning of a decoder (task=sft): the loss counts only the response tokens."""

    prompt_key: str = "prompt"  # JSONL field with the prompt
    response_key: str = "response"  # JSONL field with the response the model learns to give
    prompt_format: str = "{prompt}\n"  # the text before the response; {prompt} is the prompt
    messages_key: str = "messages"  # JSONL field with a conversation: [{"role", "content"}, ...]
    chat_template: str = ""  # Jinja template of conversations; empty: the imported model's, else jaxlm's default


@dataclass
class Seq2seqConfig:
    """Encoder-decoders: sequence to sequence (task=seq2seq: translation, summarization) and
    span corruption (task=span_corruption)."""

    source_key: str = "source"  # TSV/CSV column or JSONL field with the source text
    target_key: str = "target"  # ... and the target text
    prefix: str = ""  # text put before every source, e.g. "translate English to Spanish: "
    target_len: int = 128  # target tokens per row (data.seq_len is the source's); longer targets lose their end
    label_smoothing: float = 0.1  # share of each target's probability spread over the vocabulary
    eval_beam_size: int = 4  # beam search of evaluation (BLEU, chrF, ROUGE); 1: greedy
    length_penalty: float = 0.6  # GNMT's alpha: beam scores over ((5 + length) / 6) ** alpha
    no_repeat_ngram: int = 0  # decoding: no n tokens in a row occur twice in an output (n; 0: any may)
    max_length_ratio: float = 2.0  # decoding stops at this many times a source's tokens + max_length_offset (0: off)
    max_length_offset: int = 10  # ... and always at target_len (or --max-new-tokens)
    noise_density: float = 0.15  # task=span_corruption: share of a row's tokens in the spans to restore
    mean_span: float = 3.0  # task=span_corruption: mean span length, in tokens


@dataclass
class InitConfig:
    """Where a new run's parameters start (fine-tuning)."""

    from_workdir: str = ""  # a jaxlm workdir (a pretraining run, or `python -m jaxlm.hf import`)
    subtree: str = "encoder"  # the parameters taken from it; the rest start fresh; all: every one (a decoder; LoRA adapters start fresh)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 30
    end_lr_fraction: float = 0.1  # final lr as a fraction of the peak
    decay_fraction: float = 0.2  # wsd only: share of steps spent decaying
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 700
    batch_size: int = 32  # global, over all devices and hosts
    grad_accum_steps: int = 1  # microbatches per step (batch_size / this rows each)
    log_every: int = 25
    eval_every: int = 50
    eval_batches: int = 20  # 0 means the whole eval split
    decode_eval_examples: int = 100  # tasks scored on generated text (seq2seq): held-out examples decoded at each eval
    peak_tflops: float = 0.0  # a device's peak, for the logged mfu; 0: its datasheet figure (jaxlm.perf.PEAKS)
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: a jax.profiler trace of those steps in <workdir>/profile
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient: the update is dropped, then stop (checkpoint, exit 3) or skip
    max_skipped: int = 5  # on_nonfinite=skip: stop after this many non-finite steps in a row
    compile_cache: bool = True  # keep compiled programs in <data.cache_dir>/xla: a restart, evaluate and infer reuse them


@dataclass
class DistributedConfig:
    """Multi-process runs (one process per host, or per GPU). Empty fields come from the
    environment (JAXLM_COORDINATOR, JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID), or are detected
    under SLURM, and on TPU VMs when JAXLM_DISTRIBUTED=auto (launch/tpu_vm.sh sets it)."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: from the environment; 1 or unset: a single process
    process_id: int = -1  # -1: from the environment
    timeout_s: int = 600  # how long processes wait for each other at start-up
    cpu_collectives: str = "gloo"  # collectives between CPU processes


@dataclass
class CheckpointConfig:
    """Orbax checkpoints in <workdir>/checkpoints."""

    every: int = 200
    keep: int = 2
    async_save: bool = True
    preemption_grace_s: float = 30.0  # the scheduler's notice between SIGTERM and SIGKILL; a stop must save within it
    best_metric: str = ""  # also keep the params best by this eval metric in <workdir>/best (e.g. accuracy)


@dataclass
class MeshConfig:
    """Device mesh and the rules mapping logical axis names to mesh axes."""

    mode: str = "jit"  # jit: one program over the mesh; pmap: replicated state, pure data parallel
    data: int = -1  # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    # multi-slice (TPU pods joined by the data-center network): the slice_axis (data or fsdp)
    # spans this many slices; where all devices are in one slice, each process counts as one
    slices: int = 1
    slice_axis: str = "data"
    rules: dict[str, list[str]] = field(
        default_factory=lambda: {
            "batch": ["data", "fsdp"],
            "vocab": ["tensor"],
            "embed": ["fsdp"],
            "mlp": ["tensor"],
            "heads": ["tensor"],
            "kv": [],
            "layers": [],
            "length": [],
            "act_embed": [],
            "act_mlp": ["tensor"],
            "act_heads": ["tensor"],
            "act_vocab": ["tensor"],
        }
    )


@dataclass
class Config:
    """The whole run. Saved resolved as <workdir>/config.yaml."""

    seed: int = 0
    task: str = "clm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    seq2seq: Seq2seqConfig = field(default_factory=Seq2seqConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, e.g. `train.steps`."""
    cls = Config if cls is None else cls
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(keys(hints[f.name], f"{prefix}{f.name}."))
    return out


SECTIONS = frozenset(name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint))


def _unknown_key(key: str) -> UserError:
    valid = keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see configs/gpt_tiny.yaml for the keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise _unknown_key(e.full_key) from None
    except ValidationError as e:
        where = f" for '{e.full_key}'" if e.full_key else ""
        raise UserError(f"{origin}: bad value{where}: {_first_line(e.msg or str(e))}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{origin}: {_first_line(str(e))}") from None
    except (TypeError, ValueError) as e:  # e.g. a mapping where a list goes
        raise UserError(f"{origin}: {_first_line(str(e))}; see configs/gpt_tiny.yaml for each key's type") from None


def _check_sections(node: DictConfig, origin: str) -> None:
    """A section (e.g. `train`) given a value instead of keys is named as such."""
    for name in SECTIONS:
        if name in node and not isinstance(node[name], DictConfig) and node[name] is not None:
            raise UserError(f"{origin}: '{name}' is a section, not a value; set its keys, e.g. {name}.<key>=...")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "not accepted")


def load(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds and validates a config.

    Args:
      config_file: a YAML preset; None keeps the built-in defaults (= configs/gpt_tiny.yaml).
      overrides: `key=value` strings, e.g. `train.steps=200` or `data.paths=[a.txt,b.txt]`.

    Returns:
      The validated `Config`.

    Raises:
      UserError: a missing file, an unknown key or a bad value, named.
    """
    cfg = OmegaConf.structured(Config)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file '{config_file}' not found; pass an existing YAML file, e.g. configs/gpt_tiny.yaml")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # a YAML syntax error
            raise UserError(f"config file '{config_file}' is not valid YAML: {_first_line(str(e))}") from None
        if not isinstance(file_cfg, DictConfig):
            raise UserError(f"config file '{config_file}' holds a {type(file_cfg).__name__.removesuffix('Config').lower()}, "
                            "not a mapping of sections; write e.g. 'train:' then '  steps: 200'")
        _check_sections(file_cfg, f"config file '{config_file}'")
        cfg = _merge(cfg, file_cfg, f"config file '{config_file}'")
    for item in overrides:
        shown = f"'{item}'" if item.isprintable() else repr(item)  # a message stays one line
        if "=" not in item:
            raise UserError(f"override {shown} is not key=value; write e.g. train.steps=200")
        key = item.split("=", 1)[0]
        if key not in keys() and not key.startswith("mesh.rules."):
            raise _unknown_key(key)
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:
            raise UserError(f"override {shown} cannot be parsed: {_first_line(str(e))}") from None
        _check_sections(dot, f"override {shown}")
        cfg = _merge(cfg, dot, f"override {shown}")
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def validate(c: Config) -> None:
    """Checks values a dataclass type cannot: ranges, choices and relations between fields
    (`jaxlm.validation`); the first that fails is one UserError naming the key and the fix."""
    from jaxlm.validation import check  # (it reads this module's constants and types)
    check(c)


def to_yaml(config: Config) -> str:
    """The config as YAML, as saved in a workdir (a `${` in a text, e.g. a chat template, is
    escaped so that loading it back does not read it as an interpolation)."""
    def escaped(value):
        if isinstance(value, str):
            return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # backslashes before it too
        if isinstance(value, dict):
            return {k: escaped(v) for k, v in value.items()}
        return [escaped(v) for v in value] if isinstance(value, list) else value

    return OmegaConf.to_yaml(OmegaConf.create(escaped(dataclasses.asdict(config))))


def mixture_labels(d: DataConfig) -> list[str]:
    """The names of a mixture's sources, in order."""
    return [m.label or m.name or f"source{i}" for i, m in enumerate(d.mixture)]


def save(config: Config, path: str | Path) -> None:
    """Writes the resolved config (atomically) so later commands need only the workdir."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(config))
    tmp.replace(path)


def load_workdir(workdir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads the resolved config a training run saved in its workdir."""
    path = Path(workdir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{workdir}' holds no config.yaml; pass the --workdir of a training run")
    return load(str(path), overrides)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = _flatten(dataclasses.asdict(a)), _flatten(dataclasses.asdict(b))
    return sorted(key for key in fa.keys() | fb.keys() if fa.get(key) != fb.get(key))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rules":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
