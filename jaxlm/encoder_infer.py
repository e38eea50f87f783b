"""Inference with encoders: fill-mask (masked-LM runs), classify (classification runs) and
answer (question-answering runs).

The compiled functions live at module level with the model as a static argument, and batch
shapes are rounded up (rows to the mesh, lengths to powers of two), so a command that runs
many batches compiles each shape once.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import labeled, packing, squad
from jaxlm.errors import UserError
from jaxlm.models.encoder import Encoder
from jaxlm.tasks.qa import answer_questions
from jaxlm.workdir import Run


def _rows(run: Run, count: int) -> int:
    """`count` rounded up to a power of two, then so the batch fills the mesh's batch axes."""
    count = 1 << (count - 1).bit_length()
    mesh = run.compiled.mesh.shape
    per = mesh["data"] * mesh["fsdp"]
    return -(-count // per) * per


def _bucket(n: int, limit: int) -> int:
    """`n` rounded up to a power of two (at least 8), at most `limit`: few compiled shapes."""
    return min(max(8, 1 << (n - 1).bit_length()), max(limit, n))


@partial(jax.jit, static_argnames=("model", "vocab", "top_k"))
def _top_k_tokens(params, inputs, segments, positions, picked, *, model, vocab: int, top_k: int):
    logits, _ = model.apply({"params": params}, inputs, jnp.zeros_like(inputs), segments, positions, picked)
    logits = logits[..., :vocab]  # never the table's padding rows
    return jax.lax.top_k(jax.nn.softmax(logits), top_k)


@partial(jax.jit, static_argnames=("task",))
def _label_probabilities(params, batch, *, task):
    return jax.nn.softmax(task.logits(params, batch))


def fill_mask(run: Run, params, texts: list[str], top_k: int) -> list[list[list[tuple[str, float]]]]:
    """For each text, for each mask token in it, the top_k (token, probability) pairs."""
    tok = run.tokenizer
    if tok.mask_id is None:
        raise UserError("this run's tokenizer has no mask token; fill-mask needs a masked-LM run")
    mask_text = tok.tokenizer.id_to_token(tok.mask_id)
    encoded = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    for text, ids in zip(texts, encoded):
        if tok.mask_id not in ids:
            raise UserError(f"no {mask_text} in {text!r}; put {mask_text} where a word should be predicted")
    length = max(len(ids) for ids in encoded)
    if length > run.config.model.max_len:
        raise UserError(f"a text of {length} tokens exceeds model.max_len={run.config.model.max_len}")
    length = _bucket(length, run.config.model.max_len)
    masks = [[i for i, t in enumerate(ids) if t == tok.mask_id] for ids in encoded]
    predictions = _bucket(max(len(m) for m in masks), length)
    batch = _rows(run, len(texts))
    inputs = np.full((batch, length), tok.pad_id, np.int32)
    segments = np.zeros((batch, length), np.int32)
    picked = np.zeros((batch, predictions), np.int32)
    for i, (ids, m) in enumerate(zip(encoded, masks)):
        inputs[i, :len(ids)], segments[i, :len(ids)] = ids, 1
        picked[i, :len(m)] = m
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape)
    with run.compiled.context():
        probs, ids = jax.device_get(_top_k_tokens(params, inputs, segments, positions, picked,
                                                  model=run.task.model, vocab=tok.vocab_size, top_k=top_k))
    return [[[(tok.tokenizer.id_to_token(int(t)), float(p)) for t, p in zip(ids[i, j], probs[i, j])]
             for j in range(len(m))] for i, m in enumerate(masks)]


def classify(run: Run, params, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) of the most likely label of each text."""
    cfg = run.config
    examples = [{"text": t, "label": 0} for t in texts]
    examples += [{"text": "", "label": 0}] * (_rows(run, len(texts)) - len(texts))
    rows = labeled.ExampleRows(examples, run.tokenizer, cfg.data.seq_len)
    batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in labeled.KEYS}
    batch = packing.Packer(())(batch)  # one text a row
    with run.compiled.context():
        probs = np.asarray(_label_probabilities(params, batch, task=run.task))[: len(texts)]
    names = cfg.classify.labels or [str(i) for i in range(cfg.classify.num_labels)]
    return [(names[int(p.argmax())], float(p.max())) for p in probs]


def answer(run: Run, params, questions: list[tuple[str, str]]) -> list[tuple[str, float]]:
    """(answer, score) for each (question, context): the best span over the context's windows
    (the score is its start + end logit)."""
    cfg = run.config
    examples = [{"id": str(i), "question": q, "context": c, "answers": [], "impossible": True}
                for i, (q, c) in enumerate(questions)]
    rows = squad.QARows(examples, run.tokenizer, cfg.data.seq_len, cfg.qa)
    size = _rows(run, min(len(rows), 64))
    starts, ends = [], []
    with run.compiled.context():
        for first in range(0, len(rows), size):
            picked = [rows[i] if i < len(rows) else rows.empty() for i in range(first, first + size)]
            batch = {k: np.stack([r[k] for r in picked]) for k in squad.KEYS}
            out = _span_logits(params, batch, task=run.task)
            starts.append(np.asarray(out["start"]))
            ends.append(np.asarray(out["end"]))
    start, end = np.concatenate(starts)[:len(rows)], np.concatenate(ends)[:len(rows)]
    return [(text, score) for text, score, _ in answer_questions(rows, start, end, cfg.qa)]


@partial(jax.jit, static_argnames=("task",))
def _span_logits(params, batch, *, task):
    return task.predict(params, batch)


def embed(run: Run, params, texts: list[str], max_tokens: int, batch_size: int = 64) -> np.ndarray:
    """Unit-length embeddings [texts, embed] of texts: the encoder's hidden states averaged over
    each text's tokens (`[CLS] text [SEP]`, cut to `max_tokens`), then L2-normalized, the way
    sentence-transformers models such as all-MiniLM-L6-v2 are trained to be used. Batched by
    length, so short texts never pay for long ones."""
    tok = run.tokenizer
    encoded = [[tok.bos_id, *ids[:max_tokens - 2], tok.eos_id] for ids in tok.encode_batch(texts)]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    out = np.zeros((len(texts), run.config.model.embed_dim), np.float32)
    encoder = Encoder(run.config.model)
    with run.compiled.context():
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            length = _bucket(max(len(encoded[i]) for i in chunk), max_tokens)
            rows = _rows(run, len(chunk))
            inputs = np.zeros((rows, length), np.int32)
            segments = np.zeros((rows, length), np.int32)
            for r, i in enumerate(chunk):
                inputs[r, :len(encoded[i])], segments[r, :len(encoded[i])] = encoded[i], 1
            vectors = _mean_pooled(params["encoder"], inputs, segments, encoder=encoder)
            out[chunk] = np.asarray(vectors)[:len(chunk)]
    return out


@partial(jax.jit, static_argnames=("encoder",))
def _mean_pooled(params, inputs, segments, *, encoder):
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    hidden, _ = encoder.apply({"params": params}, inputs, jnp.zeros_like(inputs), segments, positions)
    weights = segments[..., None].astype(jnp.float32)  # [batch, length, 1]: real tokens only
    mean = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
