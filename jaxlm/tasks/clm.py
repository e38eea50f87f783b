"""Causal language modelling: next-token cross-entropy over packed rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import Config, ModelConfig
from jaxlm.data import pipeline
from jaxlm.data.sources import Corpus
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.metrics import chunked_token_sums, objective, token_metrics, token_sums
from jaxlm.models import flops
from jaxlm.models.decoder import DecoderLM, output_logits
from jaxlm.tasks.base import Documents, one_document_a_row

Array = jax.Array


class ClmTask(Documents):
    """Loss and metric sums for a GPT-style decoder.

    Metric sums (divided on the host, after aggregation over devices and steps):
      loss_sum   summed token cross-entropy in nats
      tokens     number of predicted (non-padding) tokens
      correct    tokens whose target has the largest logit (the argmax prediction)
      bytes      UTF-8 bytes the predicted tokens stand for (bits-per-byte denominator)
    """

    batch_keys = ("inputs", "targets", "segment_ids", "positions")
    terms = (("loss_sum", "tokens"),)  # the loss: summed token loss over tokens
    lower_is_better = frozenset({"loss", "perplexity", "bits_per_byte"})

    def __init__(self, model_cfg: ModelConfig, byte_lengths: np.ndarray):
        self.model = DecoderLM(model_cfg)
        table = np.zeros(model_cfg.vocab_size, np.float32)
        table[: len(byte_lengths)] = byte_lengths
        self._byte_lengths = table  # [vocab]
        self.vocab = len(byte_lengths)  # the tokenizer's ids: the softmax's (the table's padding is not text)

    @staticmethod
    def rows(config: Config, splits: Corpus, tok: TextTokenizer) -> dict[str, pipeline.TokenRows]:
        return pipeline.token_rows(splits, tok, config.data)

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> ClmTask:
        return cls(config.model, tok.byte_lengths())

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes, for initialisation and compilation."""
        return {k: np.ones((batch_size, seq_len), np.int32) for k in self.batch_keys}

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random tokens, one document a row (benchmarks)."""
        tokens = rng.integers(0, self.vocab, (batch_size, seq_len + 1), dtype=np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "segment_ids": np.ones((batch_size, seq_len), np.int32),
                "positions": one_document_a_row(batch_size, seq_len)}

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of a forward pass: causal blocks and the output layer on every token."""
        cfg = self.model.cfg
        return (flops.blocks(cfg, batch_size, seq_len, causal=True)
                + flops.dense(batch_size * seq_len, cfg.embed_dim, cfg.vocab_size))

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        """Boxed (logically annotated) variables of the model."""
        return self.model.init(rng, batch["inputs"], batch["segment_ids"], batch["positions"])

    def weights(self, batch: dict[str, Array]) -> Array:
        """[batch, length] 1.0 on the targets the loss counts: every real token."""
        return (batch["segment_ids"] != 0).astype(jnp.float32)

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        """The loss's denominators over `batch`."""
        return {"tokens": self.weights(batch).sum()}

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        """Mean token loss (for the gradient; over `totals` when given) and metric sums.

        With `model.logits_chunk`, the output layer and the loss run a slice of every row at a
        time (`chunked_token_sums`): the same sums without the whole [batch, length, vocab] logits.
        """
        cfg = self.model.cfg
        chunk = cfg.logits_chunk
        weights = self.weights(batch)
        out = self.model.apply(
            {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
            deterministic=not train, hidden_only=bool(chunk), rngs={"dropout": rng})
        if chunk:  # out: [batch, length, embed]
            loss_sum, correct = chunked_token_sums(lambda p, h: output_logits(p, h, cfg), params, out,
                                                   batch["targets"], weights, chunk, self.vocab)
        else:  # out: [batch, length, vocab]
            loss_sum, correct = token_sums(out, batch["targets"], weights, self.vocab)
        tokens = weights.sum()
        nbytes = (jnp.asarray(self._byte_lengths)[batch["targets"]] * weights).sum()
        sums = {"loss_sum": loss_sum, "tokens": tokens, "correct": correct, "bytes": nbytes}
        return objective(sums, self.terms, totals), sums

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        """Host-side metrics from summed device metrics."""
        out = token_metrics(sums, "tokens")
        if float(sums.get("bytes", 0)) > 0:
            out["bits_per_byte"] = float(sums["loss_sum"]) / (math.log(2) * float(sums["bytes"]))
        return out
