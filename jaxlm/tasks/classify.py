"""Sequence classification: cross-entropy over labels from the encoder's pooled first token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import Config, ModelConfig
from jaxlm.data import labeled, packing
from jaxlm.data.sources import Splits
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.metrics import objective
from jaxlm.microbatch import Layout
from jaxlm.models import flops
from jaxlm.models.encoder import EncoderClassifier
from jaxlm.tasks.base import SplitRows, one_document_a_row

Array = jax.Array


class ClassifyTask:
    """Loss and metric sums for an encoder classifier.

    Metric sums: loss_sum, examples, correct, and per label k: tp_k, fp_k, fn_k (for macro-F1).
    Padding examples (label -1) count nowhere.
    """

    batch_keys = ("inputs", "token_types", "segment_ids", "positions", "pool_at", "labels")
    terms = (("loss_sum", "examples"),)
    lower_is_better = frozenset({"loss"})

    @staticmethod
    def resolve(config: Config) -> Config:
        """With a TFDS catalog dataset, the label names come from the dataset."""
        if config.data.source != "tfds":
            return config
        names = labeled.catalog_labels(config.data, config.classify)
        return dataclasses.replace(config, classify=dataclasses.replace(config.classify, labels=names))

    @staticmethod
    def load_splits(config: Config) -> Splits:
        if config.data.source == "tfds":
            return labeled.load_catalog(config.data, config.classify)
        return labeled.load_splits(config.data, config.classify)

    @staticmethod
    def rows(config: Config, splits: Splits, tok: TextTokenizer) -> SplitRows:
        return SplitRows(lambda name: labeled.ExampleRows(getattr(splits, name), tok, config.data.seq_len))

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> ClassifyTask:
        return cls(config.model, config.classify.num_labels)

    def __init__(self, model_cfg: ModelConfig, num_labels: int):
        self.model = EncoderClassifier(model_cfg, num_labels)
        self.num_labels = num_labels

    def packer(self, rows: labeled.ExampleRows, layout: Layout, host_batch: int) -> packing.Packer:
        """Packs examples several to a row, in the groups of `layout`, at sizes measured on `rows`."""
        return packing.packer_for(rows, layout, host_batch)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        batch = {k: np.ones((batch_size, seq_len), np.int32) for k in self.batch_keys}
        batch["labels"] = np.zeros(batch_size, np.int32)
        batch["pool_at"] = np.arange(batch_size, dtype=np.int32) * seq_len
        return batch

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random tokens and labels, one example a row (benchmarks)."""
        batch = self.dummy_batch(batch_size, seq_len)
        batch["inputs"] = rng.integers(0, self.model.cfg.vocab_size, (batch_size, seq_len), dtype=np.int32)
        batch["token_types"] = np.zeros((batch_size, seq_len), np.int32)
        batch["positions"] = one_document_a_row(batch_size, seq_len)
        batch["labels"] = rng.integers(0, self.num_labels, batch_size, dtype=np.int32)
        return batch

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of a forward pass: bidirectional blocks, pooler and classifier, one example a row."""
        cfg = self.model.cfg
        return (flops.blocks(cfg, batch_size, seq_len, causal=False)
                + flops.dense(batch_size, cfg.embed_dim, cfg.embed_dim)
                + flops.dense(batch_size, cfg.embed_dim, self.num_labels))

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        return self.model.init(rng, batch["inputs"], batch["token_types"], batch["segment_ids"],
                               batch["positions"], pool_at=batch["pool_at"])

    def logits(self, params: dict, batch: dict[str, Array], rng: Array | None = None,
               train: bool = False) -> Array:
        """[examples, num_labels] float32."""
        return self.model.apply({"params": params}, batch["inputs"], batch["token_types"],
                                batch["segment_ids"], batch["positions"], deterministic=not train,
                                pool_at=batch["pool_at"], rngs={"dropout": rng} if train else {})

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        return {"examples": (batch["labels"] >= 0).sum().astype(jnp.float32)}

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        logits = self.logits(params, batch, rng, train)
        labels = batch["labels"]  # [batch]
        weights = (labels >= 0).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        predicted = logits.argmax(-1)
        sums = {"loss_sum": (losses * weights).sum(), "examples": weights.sum(),
                "correct": ((predicted == labels) * weights).sum()}
        for k in range(self.num_labels):
            sums[f"tp_{k}"] = ((predicted == k) & (labels == k)).sum().astype(jnp.float32)
            sums[f"fp_{k}"] = ((predicted == k) & (labels != k) & (labels >= 0)).sum().astype(jnp.float32)
            sums[f"fn_{k}"] = ((predicted != k) & (labels == k)).sum().astype(jnp.float32)
        return objective(sums, self.terms, totals), sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(float(sums["examples"]), 1.0)
        f1s = []
        for k in range(self.num_labels):
            tp, fp, fn = (float(sums[f"{m}_{k}"]) for m in ("tp", "fp", "fn"))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        loss = float(sums["loss_sum"]) / count
        return {"loss": loss, "accuracy": float(sums["correct"]) / count, "macro_f1": sum(f1s) / len(f1s)}
