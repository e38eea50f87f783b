"""Validation of a config: ranges, choices and relations between fields that a dataclass type
cannot express. Each failed check is one `UserError` naming the key and the fix."""

from __future__ import annotations

import math

from jaxlm.config import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    DECODER_TASKS,
    DTYPES,
    ENCODER_DECODER_TASKS,
    INITS,
    LORA_TARGETS,
    MLPS,
    NORMS,
    POSITIONS,
    REMAT,
    ROPE_SCALINGS,
    SCHEDULES,
    SOURCES,
    TASKS,
    Config,
    mixture_labels,
)
from jaxlm.errors import UserError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}; pick one of those")


def check(c: Config) -> None:
    """Checks values a dataclass type cannot: ranges, choices and relations between fields."""
    m, d, o, t, k, mesh = c.model, c.data, c.optim, c.train, c.checkpoint, c.mesh
    _choice("task", c.task, TASKS)
    for name, value in [
        ("model.num_layers", m.num_layers), ("model.embed_dim", m.embed_dim),
        ("model.num_heads", m.num_heads), ("model.max_len", m.max_len),
        ("model.vocab_multiple", m.vocab_multiple), ("data.seq_len", d.seq_len),
        ("data.vocab_size", d.vocab_size), ("train.steps", t.steps),
        ("train.batch_size", t.batch_size), ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every), ("checkpoint.every", k.every), ("checkpoint.keep", k.keep),
    ]:
        _require(value > 0, f"{name}={value} must be a positive integer")
    _require(k.preemption_grace_s > 0, f"checkpoint.preemption_grace_s={k.preemption_grace_s} must be positive "
             "(the seconds your scheduler gives between SIGTERM and SIGKILL)")
    for name, value in [("model.mlp_dim", m.mlp_dim), ("model.vocab_size", m.vocab_size),
                        ("optim.warmup_steps", o.warmup_steps), ("train.eval_batches", t.eval_batches),
                        ("data.prefetch", d.prefetch), ("data.prepare_workers", d.prepare_workers),
                        ("data.tokenizer_sample_mb", d.tokenizer_sample_mb), ("model.logits_chunk", m.logits_chunk)]:
        _require(value >= 0, f"{name}={value} must be >= 0")
    _require(m.head_dim > 0 or m.embed_dim % m.num_heads == 0,
             f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}; "
             "pick heads that divide the width, or set model.head_dim")
    _require(m.positions != "rotary" or m.head_size % 2 == 0,
             f"rotary positions need an even head size, got {m.head_size}; change model.embed_dim or model.num_heads")
    _require(m.head_dim >= 0 and m.decoder_layers >= 0 and m.relative_buckets >= 2 and m.relative_max_distance > 0,
             "model.head_dim and model.decoder_layers must be >= 0 (0: the default), model.relative_buckets >= 2, "
             "model.relative_max_distance > 0")
    _choice("model.positions", m.positions, POSITIONS)
    _choice("model.norm", m.norm, NORMS)
    _choice("model.activation", m.activation, ACTIVATIONS)
    _choice("model.mlp", m.mlp, MLPS)
    _choice("model.init", m.init, INITS)
    _require(m.lora_rank >= 0 and m.lora_alpha > 0, "model.lora_rank must be >= 0 (0: no adapters) and model.lora_alpha > 0")
    unknown = set(m.lora_targets.split(",")) - set(LORA_TARGETS)
    _require(not unknown, f"model.lora_targets names {', '.join(sorted(unknown))}; pick from {', '.join(LORA_TARGETS)}")
    _choice("model.rope_scaling", m.rope_scaling, ROPE_SCALINGS)
    _require(m.rope_scaling == "none" or (m.rope_factor >= 1 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                         and m.rope_original_max_len > 0),
             "model.rope_scaling=llama3 needs rope_factor >= 1, 0 < rope_low_freq_factor < rope_high_freq_factor "
             "and rope_original_max_len > 0")
    _require(m.num_kv_heads >= 0 and m.num_heads % (m.num_kv_heads or m.num_heads) == 0,
             f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} (0: as many as num_heads)")
    _require(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be positive")
    _require(m.dtype != "float16", "model.dtype=float16 needs loss scaling, which jaxlm does not do; "
             "use model.dtype=bfloat16 (same speed, float32's range)")
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.attention_impl", m.attention_impl, ATTENTION_IMPLS)
    _choice("model.remat", m.remat, REMAT)
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _require(d.seq_len <= m.max_len, f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}; raise model.max_len")
    _require(not m.logits_chunk or c.task in DECODER_TASKS,
             f"model.logits_chunk is for decoders (task=clm or sft), not task={c.task}; leave it 0")
    _require(not m.logits_chunk or d.seq_len % m.logits_chunk == 0,
             f"model.logits_chunk={m.logits_chunk} does not divide data.seq_len={d.seq_len}; pick a divisor (or 0)")
    _require(0.0 < c.mlm.mask_rate < 1.0, f"mlm.mask_rate={c.mlm.mask_rate} must be in (0, 1)")
    _choice("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _require(t.max_skipped > 0, f"train.max_skipped={t.max_skipped} must be a positive integer")
    _choice("data.source", d.source, SOURCES)
    _choice("data.encoding_errors", d.encoding_errors, ("strict", "replace"))
    _require(d.source not in ("text", "labeled", "squad", "prompts") or bool(d.paths),
             f"data.source={d.source} needs data.paths, e.g. data.paths=[corpus/*.txt]")
    _require(c.task == "classify" or d.source != "labeled",
             f"data.source=labeled (TSV/CSV/JSONL examples) is for task=classify, not task={c.task}")
    _require(c.task != "classify" or d.source in ("labeled", "tfds", "none"),
             f"task=classify reads labeled files (data.source=labeled) or a TFDS catalog dataset "
             f"(data.source=tfds data.name=glue/sst2), not data.source={d.source}")
    _require(d.source in ("prompts", "none") if c.task == "sft" else d.source != "prompts",
             f"task=sft reads JSONL prompt/response files (data.source=prompts), and data.source=prompts is for "
             f"task=sft; got task={c.task} with data.source={d.source}")
    _require("{prompt}" in c.sft.prompt_format, f"sft.prompt_format={c.sft.prompt_format!r} must contain {{prompt}}")
    _require(d.source in ("parallel", "tfds", "none") if c.task == "seq2seq" else d.source != "parallel",
             "data.source=parallel (TSV/CSV/JSONL source/target pairs) goes with task=seq2seq, which also reads a "
             f"TFDS catalog dataset (data.source=tfds data.name=wmt14_translate/de-en); got task={c.task} with "
             f"data.source={d.source}")
    _require(c.seq2seq.target_len > 0 and 0.0 <= c.seq2seq.label_smoothing < 1.0 and c.seq2seq.eval_beam_size > 0
             and c.seq2seq.length_penalty >= 0 and t.decode_eval_examples >= 0 and c.seq2seq.max_length_ratio >= 0
             and c.seq2seq.max_length_offset >= 1 and c.seq2seq.no_repeat_ngram >= 0,
             "seq2seq.target_len and seq2seq.eval_beam_size must be positive, seq2seq.label_smoothing in [0, 1), "
             "seq2seq.length_penalty, seq2seq.max_length_ratio, seq2seq.no_repeat_ngram and train.decode_eval_examples >= 0, "
             "seq2seq.max_length_offset >= 1")
    _require(c.task != "span_corruption" or (d.source in ("builtin", "text", "tfds") and 0 < c.seq2seq.noise_density < 1
                                              and c.seq2seq.mean_span >= 1),
             "task=span_corruption reads raw text (data.source=builtin, text or tfds) and needs "
             "0 < seq2seq.noise_density < 1 and seq2seq.mean_span >= 1")
    _require(c.task in ENCODER_DECODER_TASKS or m.positions in ("rotary", "learned"),
             f"model.positions={m.positions} is an encoder-decoder's (task=seq2seq, span_corruption); decoders and encoders "
             "take rotary or learned")
    _require(c.task in ENCODER_DECODER_TASKS or not m.copy_attention,
             f"model.copy_attention copies from an encoder-decoder's source (task=seq2seq, span_corruption); "
             f"set it false for task={c.task}")
    _require(c.task == "qa" or d.source != "squad",
             f"data.source=squad (SQuAD JSON files) is for task=qa, not task={c.task}")
    _require(c.task != "qa" or d.source in ("squad", "tfds", "none"),
             f"task=qa reads SQuAD JSON files (data.source=squad) or a TFDS catalog dataset "
             f"(data.source=tfds data.name=squad), not data.source={d.source}")
    q = c.qa
    _require(q.max_answer_tokens > 0 and q.n_best > 0 and q.max_question_tokens > 0,
             "qa.max_answer_tokens, qa.n_best and qa.max_question_tokens must be positive")
    _require(q.doc_stride >= 0, f"qa.doc_stride={q.doc_stride} must be >= 0")
    _require(c.classify.num_labels >= 2, f"classify.num_labels={c.classify.num_labels} must be at least 2")
    _require(not c.classify.labels or len(c.classify.labels) == c.classify.num_labels,
             f"classify.labels has {len(c.classify.labels)} names but classify.num_labels={c.classify.num_labels}")

    _require(d.source != "tfds" or bool(d.name), "data.source=tfds needs data.name, e.g. data.name=lm1b")
    _require(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
    _require(d.shard_mb > 0, f"data.shard_mb={d.shard_mb} must be positive")
    _validate_mixture(c)
    _require(d.vocab_size >= 260, f"data.vocab_size={d.vocab_size} is too small; byte-level BPE needs at least 260")
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _require(o.learning_rate > 0 and math.isfinite(o.learning_rate), f"optim.learning_rate={o.learning_rate} must be positive")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(0.0 <= o.end_lr_fraction <= 1.0, f"optim.end_lr_fraction={o.end_lr_fraction} must be in [0, 1]")
    _require(0.0 < o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    _require(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0 (0 disables clipping)")
    _require(t.peak_tflops >= 0 and math.isfinite(t.peak_tflops), f"train.peak_tflops={t.peak_tflops} must be >= 0")
    _require(not t.profile_steps or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
             f"train.profile_steps={t.profile_steps} must be [first, last] with 1 <= first <= last, e.g. [10, 12]")
    _choice("mesh.mode", mesh.mode, ("jit", "pmap"))
    _choice("mesh.slice_axis", mesh.slice_axis, ("data", "fsdp"))
    _require(mesh.slices >= 1, f"mesh.slices={mesh.slices} must be at least 1")
    _require(c.distributed.timeout_s > 0, f"distributed.timeout_s={c.distributed.timeout_s} must be positive")
    sizes = {"mesh.data": mesh.data, "mesh.fsdp": mesh.fsdp, "mesh.tensor": mesh.tensor}
    for name, value in sizes.items():
        _require(value == -1 or value > 0, f"{name}={value} must be positive or -1 (the remaining devices)")
    _require(list(sizes.values()).count(-1) <= 1, "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for logical, axes in mesh.rules.items():
        for axis in axes:
            _require(axis in ("data", "fsdp", "tensor"),
                     f"mesh.rules.{logical} names mesh axis '{axis}'; use data, fsdp or tensor")


def _validate_mixture(c: Config) -> None:
    d = c.data
    if not d.mixture:
        return
    _require(not (d.paths or d.eval_paths or d.name) and d.source in ("builtin", "text", "tfds"),
             "data.mixture names its own sources; leave data.paths, data.eval_paths and data.name empty")
    _require(c.task in ("clm", "mlm") and not c.mlm.nsp,
             f"data.mixture is for language-model pretraining (task=clm, or task=mlm without mlm.nsp), not "
             f"task={c.task}{' with mlm.nsp' if c.mlm.nsp and c.task == 'mlm' else ''}")
    for i, m in enumerate(d.mixture):
        _require(bool(m.paths) != bool(m.name),
                 f"data.mixture[{i}] needs either paths (text files) or name (a TFDS dataset), not both or neither")
        _require(m.weight > 0 and math.isfinite(m.weight), f"data.mixture[{i}].weight={m.weight} must be positive")
    labels = mixture_labels(d)
    _require(len(set(labels)) == len(labels), f"data.mixture labels {labels} repeat; give each source a distinct label")
