"""A run directory and the objects built from it.

Layout of a workdir:
  config.yaml        the resolved config (every later command needs only the workdir)
  tokenizer.json     the run's tokenizer
  checkpoints/<step> Orbax checkpoints (params, opt, data position, meta)
  metrics.jsonl      one JSON object per line: {"step", "kind", ...metrics}
  tensorboard/       TensorBoard event files
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxlm import config as config_lib
from jaxlm import optim, sharding, tasks
from jaxlm.checkpoint import Checkpoints
from jaxlm.config import Config
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import cache_dir
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError
from jaxlm.models.layers import padded_vocab
from jaxlm.steps import Compiled, PmapCompiled

# Keys a rerun on an existing workdir may change (how long, how often, on which devices, how
# computed); any other change would silently mix two runs.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.decode_eval_examples", "seq2seq.eval_beam_size", "seq2seq.length_penalty",
                     "seq2seq.no_repeat_ngram", "train.peak_tflops", "train.profile_steps", "train.on_nonfinite", "train.max_skipped",
                     "train.compile_cache",
                     "train.grad_accum_steps", "checkpoint.every", "checkpoint.keep", "checkpoint.preemption_grace_s",
                     "checkpoint.async_save", "checkpoint.best_metric", "data.cache_dir", "data.prefetch",
                     "data.prepare_workers", "data.prepare_runner", "data.beam_options", "data.shard_mb",
                     "data.tokenizer_sample_mb", "model.remat", "model.logits_chunk", "model.dtype", "model.attention_impl",
                     "mesh.mode", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.slices", "mesh.slice_axis",
                     "mesh.rules", "distributed.coordinator", "distributed.num_processes", "distributed.process_id",
                     "distributed.timeout_s", "distributed.cpu_collectives")


# What a fine-tuning run takes from the model it starts from (init.from_workdir): its shapes.
# Numerics of the new run (dropout, dtype, remat, scan, attention backend) stay its own.
INHERITED_MODEL_FIELDS = ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp", "mlp_dim", "vocab_size",
                          "vocab_multiple", "max_len", "positions", "rope_base", "rope_scaling", "rope_factor",
                          "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "norm",
                          "norm_eps", "activation", "type_vocab_size", "use_bias", "qkv_bias", "tie_embeddings")


def inherit_model(config: Config) -> Config:
    """With `init.from_workdir`: the model shapes, tokenizer and chat template of that run."""
    source = config.init.from_workdir
    if not source:
        return config
    saved = config_lib.load_workdir(source)
    model = dataclasses.replace(config.model, **{f: getattr(saved.model, f) for f in INHERITED_MODEL_FIELDS})
    data, sft = config.data, config.sft
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=str(Path(source) / "tokenizer.json"))
    if not sft.chat_template:  # conversations are written as the model learned to read them
        sft = dataclasses.replace(sft, chat_template=saved.sft.chat_template)
    return dataclasses.replace(config, model=model, data=data, sft=sft)


def with_vocab(config: Config, tok: TextTokenizer) -> Config:
    """Sets model.vocab_size from the tokenizer and the ids the task adds (T5's sentinels),
    rounded up so it shards, or checks it."""
    size, needed = config.model.vocab_size, tok.vocab_size + getattr(tasks.task_class(config), "extra_ids", 0)
    if size == 0:
        size = padded_vocab(needed, config.model.vocab_multiple)
    elif size < needed:
        raise UserError(f"model.vocab_size={size} is smaller than the {needed} ids the run needs (the tokenizer's "
                        f"{tok.vocab_size} and the task's); set model.vocab_size=0 to follow the tokenizer")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=size))


def check_same_run(saved: Config, new: Config, workdir: Path) -> None:
    """A rerun on a workdir must describe the same run (bar the keys in RESUMABLE_CHANGES)."""
    changed = [k for k in config_lib.diff(saved, new) if k not in RESUMABLE_CHANGES]
    if changed:
        raise UserError(f"'{workdir}' holds a run with a different config ({', '.join(changed)} differ); "
                        "rerun with the same settings to resume, or pass a new --workdir")


@dataclass
class Run:
    """What a command needs to train, evaluate or infer with one config."""

    config: Config
    tokenizer: TextTokenizer
    task: tasks.Task
    compiled: Compiled


def use_compile_cache(config: Config) -> Path | None:
    """Turns on JAX's persistent compilation cache in `<data.cache_dir>/xla` (`train.compile_cache`),
    unless JAX already has a cache directory (`JAX_COMPILATION_CACHE_DIR`, the user's own); returns
    the directory in use, if any.

    Programs that took JAX at least a second to compile are kept, keyed by the program, the
    devices and the compiler's flags, so a resumed run, and `evaluate` and `infer` on a trained
    run, load what an earlier process compiled instead of compiling it again. Training
    (`jaxlm.train.prepare`) and the commands that open a trained run (`open_run`) turn it on;
    `--compile-only` and `jaxlm.bench` leave it off, since they measure compilation."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if not config.train.compile_cache:
        return None
    path = cache_dir(config.data) / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def build(config: Config, tok: TextTokenizer, mode: str | None = None) -> Run:
    """Task, optimizer, mesh and compiled steps for a config whose vocab size is resolved.

    `mode` overrides `mesh.mode` (evaluation and inference always use jit: checkpoints restore
    in either mode).
    """
    pmap = (mode or config.mesh.mode) == "pmap"
    if pmap:
        sharding.check_pmap_processes()
    task = tasks.build(config, tok)
    tx = optim.optimizer(config.optim, config.train.steps, adapters=config.model.lora_rank > 0)
    mesh = sharding.make_mesh(config.mesh)
    batch = config.train.batch_size
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = config.train.grad_accum_steps
    if batch % (rows * accum):
        raise UserError(f"train.batch_size={batch} does not split into train.grad_accum_steps={accum} "
                        f"microbatches over data x fsdp = {rows} devices; use a multiple of {rows * accum}")
    if batch % jax.process_count():
        raise UserError(f"train.batch_size={batch} does not divide over {jax.process_count()} processes")
    if pmap:
        if batch % (jax.local_device_count() * jax.process_count() * accum):
            raise UserError(f"train.batch_size={batch} does not split over {jax.device_count()} devices "
                            f"x {accum} microbatches in pmap mode; use a multiple of {jax.device_count() * accum}")
        compiled = PmapCompiled(task, tx, batch, config.data.seq_len, accum)
    else:
        compiled = Compiled(task, tx, mesh, sharding.rules(config.mesh), batch, config.data.seq_len, accum)
    return Run(config, tok, task, compiled)


def shapes_run(config: Config, mode: str | None = None) -> Run:
    """A run of the config's shapes that needs no data, for compiling and benchmarking: the
    tokenizer the config names (or its source run's), else a placeholder vocabulary of
    `data.vocab_size` tokens."""
    config = inherit_model(config)
    tok = (tokenizer_lib.from_file(config.data.tokenizer) if config.data.tokenizer
           else tokenizer_lib.placeholder(config.data.vocab_size))
    return build(with_vocab(config, tok), tok, mode)


def open_run(workdir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Run, Checkpoints]:
    """A finished or running training run, for evaluate and infer."""
    workdir = Path(workdir)
    config = config_lib.load_workdir(workdir, overrides)
    tok = tokenizer_lib.from_file(workdir / "tokenizer.json")
    use_compile_cache(config)
    return build(config, tok, mode="jit"), Checkpoints(workdir / "checkpoints", read_only=True)

