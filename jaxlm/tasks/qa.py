"""Extractive question answering: start and end logits over each window's tokens, trained with
cross-entropy toward the answer's first and last token ([CLS] where a window holds none); the
answer of a question is the best span over all its windows, mapped back to context characters.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import Config, QAConfig
from jaxlm.data import squad
from jaxlm.data.sources import Splits
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError
from jaxlm.metrics import objective, squad_scores
from jaxlm.microbatch import Layout
from jaxlm.models import flops
from jaxlm.models.encoder import EncoderQA
from jaxlm.tasks.base import SplitRows, one_document_a_row

Array = jax.Array


class QATask:
    """Loss and metric sums of a span head over question + context windows.

    Metric sums: loss_sum (start and end cross-entropy, averaged), windows, start_correct,
    end_correct. Padding windows (label -1) count nowhere. Exact match and F1 come from
    `predict` and `score` over whole questions.
    """

    batch_keys = squad.KEYS
    terms = (("loss_sum", "windows"),)
    lower_is_better = frozenset({"loss"})

    @staticmethod
    def resolve(config: Config) -> Config:
        return config

    @staticmethod
    def load_splits(config: Config) -> Splits:
        if config.data.source == "tfds":
            return squad.load_catalog(config.data)
        return squad.load_splits(config.data)

    @staticmethod
    def rows(config: Config, splits: Splits, tok: TextTokenizer) -> SplitRows:
        if not config.qa.null_answers and any(e["impossible"] for e in splits.train):
            raise UserError("the training data has unanswerable questions (SQuAD 2.0); set qa.null_answers=true "
                            "so the model learns and predicts the null answer")
        return SplitRows(lambda name: squad.QARows(getattr(splits, name), tok, config.data.seq_len, config.qa))

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> QATask:
        return cls(config)

    def __init__(self, config: Config):
        self.model = EncoderQA(config.model)
        self.qa: QAConfig = config.qa

    def packer(self, rows: squad.QARows, layout: Layout, host_batch: int) -> None:
        return None  # windows fill most of a row (about 80% on SQuAD-like data): packing would not pay

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        batch = {k: np.ones((batch_size, seq_len), np.int32) for k in self.batch_keys}
        batch["starts"] = batch["ends"] = np.zeros(batch_size, np.int32)
        return batch

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random tokens and answer spans, one window a row (benchmarks)."""
        batch = self.dummy_batch(batch_size, seq_len)
        batch["inputs"] = rng.integers(0, self.model.cfg.vocab_size, (batch_size, seq_len), dtype=np.int32)
        batch["token_types"] = (np.arange(seq_len) >= seq_len // 4).astype(np.int32)[None].repeat(batch_size, 0)
        batch["positions"] = one_document_a_row(batch_size, seq_len)
        batch["starts"] = rng.integers(seq_len // 4, seq_len - 1, batch_size, dtype=np.int32)
        batch["ends"] = np.minimum(batch["starts"] + 3, seq_len - 1).astype(np.int32)
        return batch

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of a forward pass: bidirectional blocks and the span head on every token."""
        cfg = self.model.cfg
        return flops.blocks(cfg, batch_size, seq_len, causal=False) + flops.dense(batch_size * seq_len, cfg.embed_dim, 2)

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        return self.model.init(rng, batch["inputs"], batch["token_types"], batch["segment_ids"], batch["positions"])

    def logits(self, params: dict, batch: dict[str, Array], rng: Array | None = None,
               train: bool = False) -> tuple[Array, Array]:
        """Start and end logits [batch, length]; positions outside a window's tokens get -1e9."""
        start, end = self.model.apply({"params": params}, batch["inputs"], batch["token_types"],
                                      batch["segment_ids"], batch["positions"], deterministic=not train,
                                      rngs={"dropout": rng} if train else {})
        real = batch["segment_ids"] > 0
        return jnp.where(real, start, -1e9), jnp.where(real, end, -1e9)

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        return {"windows": (batch["starts"] >= 0).sum().astype(jnp.float32)}

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        start, end = self.logits(params, batch, rng, train)
        weights = (batch["starts"] >= 0).astype(jnp.float32)  # [batch]
        sums = {"windows": weights.sum()}
        losses = 0.0
        for name, logits in (("start", start), ("end", end)):
            labels = jnp.maximum(batch[f"{name}s"], 0)
            losses += optax.softmax_cross_entropy_with_integer_labels(logits, labels) / 2
            sums[f"{name}_correct"] = ((logits.argmax(-1) == labels) * weights).sum()
        sums["loss_sum"] = (losses * weights).sum()
        return objective(sums, self.terms, totals), sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(float(sums["windows"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / count, "start_accuracy": float(sums["start_correct"]) / count,
                "end_accuracy": float(sums["end_correct"]) / count}

    def predict(self, params: dict, batch: dict[str, Array]) -> dict[str, Array]:
        """Per-row outputs that `score` turns into answers: start and end logits [batch, length]."""
        start, end = self.logits(params, batch)
        return {"start": start, "end": end}

    def score(self, rows: squad.QARows, outputs: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, str]]:
        """Exact match and F1 of the best answers of the split's questions, and those answers as
        SQuAD's official predictions file (question id -> answer text)."""
        answers = answer_questions(rows, outputs["start"], outputs["end"], self.qa)
        predictions = {e["id"]: text for e, (text, _, _) in zip(rows.examples, answers)}
        golds = {e["id"]: [a["text"] for a in e["answers"]] for e in rows.examples}
        return squad_scores(predictions, golds), {"predictions.json": json.dumps(predictions, indent=1) + "\n"}


def best_span(start: np.ndarray, end: np.ndarray, offsets: np.ndarray, n_best: int,
              max_tokens: int) -> tuple[float, int, int] | None:
    """(score, first, last) of the best span of one window: start + end logit over the top
    `n_best` starts and ends among context tokens, last not before first, at most `max_tokens`
    long; None where no span qualifies."""
    context = offsets[:, 0] >= 0
    if not context.any():
        return None
    masked_start, masked_end = np.where(context, start, -np.inf), np.where(context, end, -np.inf)
    firsts = np.argsort(-masked_start, kind="stable")[:n_best]
    lasts = np.argsort(-masked_end, kind="stable")[:n_best]
    best = None
    for s in firsts:
        for e in lasts:
            if not (context[s] and context[e]) or e < s or e - s + 1 > max_tokens:
                continue
            score = float(start[s] + end[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


def answer_questions(rows: squad.QARows, start: np.ndarray, end: np.ndarray,
                     cfg: QAConfig) -> list[tuple[str, float, int]]:
    """For each example of `rows`: (answer text, score, window) of its best span over all its
    windows, from start / end logits [windows, length]. With `qa.null_answers` (SQuAD 2.0), ""
    when [CLS] (the null answer, at its lowest score over the windows) outscores the best span
    by more than `qa.null_threshold`."""
    best: list[tuple[float, int, int, int] | None] = [None] * len(rows.examples)
    null = np.full(len(rows.examples), np.inf)
    for w in range(len(rows)):
        i = rows.example[w]
        null[i] = min(null[i], float(start[w, 0] + end[w, 0]))
        span = best_span(start[w], end[w], rows.offsets[w], cfg.n_best, cfg.max_answer_tokens)
        if span is not None and (best[i] is None or span[0] > best[i][0]):
            best[i] = (*span, w)
    out = []
    for e, b, n in zip(rows.examples, best, null):
        if b is None or (cfg.null_answers and n > b[0] + cfg.null_threshold):
            out.append(("", float(n), -1))
            continue
        score, s, t, w = b
        out.append((e["context"][rows.offsets[w, s, 0]:rows.offsets[w, t, 1]].strip(), score, w))
    return out
