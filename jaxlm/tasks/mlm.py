"""Masked-language modelling (BERT / RoBERTa style) over packed rows.

Masks are drawn on device inside the loss, from the masks stream of the run's seed (see
`jaxlm.rngs`) and each row's global index in the data stream (`row_ids`, 64-bit), so they depend
neither on the step's device layout (mesh, pmap, microbatches) nor on restarts: a resumed run
masks exactly as it would have. Each epoch visits a row at another global index, so the masks
change every epoch (dynamic masking). Evaluation masks come from a fixed seed, so eval figures
of runs with different seeds are comparable.

Of the non-special tokens of a row, `round(mask_rate * n)` are selected (whole words together
with `whole_word`); of those, 80% become the mask token, 10% a random token and 10% stay.
Loss and accuracy count only selected positions, and the vocabulary projection runs only for
them: at most `ceil(mask_rate * seq_len)` positions a row are gathered before the output layer.

With `mlm.nsp` each row is a `[CLS] A [SEP] B [SEP]` pair (token types 0 and 1) with
`nsp_labels` (0: B continues A, 1: B comes from another document; -1: padding), and the loss
adds next-sentence cross-entropy over pairs to the masked-token loss over masked tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import rngs
from jaxlm.config import Config, MlmConfig, ModelConfig
from jaxlm.data import pairs, pipeline
from jaxlm.data.sources import Corpus
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError
from jaxlm.metrics import objective, token_metrics, token_sums
from jaxlm.models import flops
from jaxlm.models.encoder import EncoderMLM
from jaxlm.tasks.base import Documents, one_document_a_row

Array = jax.Array


def max_predictions(mask_rate: float, seq_len: int) -> int:
    """Positions gathered per row for the output layer."""
    return max(1, math.ceil(mask_rate * seq_len))


def select(u: Array, candidate: Array, word_start: Array, rate: float) -> Array:
    """Which positions of each row to predict ([batch, length] bool).

    Args:
      u: [batch, length] uniform noise.
      candidate: [batch, length] positions that may be selected (not special, not padding).
      word_start: [batch, length] the token starts a word (all True: token-level masking).
      rate: share of candidates to select, rounded per row.
    """
    index = jnp.arange(u.shape[1])
    start_at = jax.lax.cummax(jnp.where(word_start, index, 0), axis=1)  # first token of each word
    score = jnp.take_along_axis(u, start_at, axis=1)  # every token of a word shares its word's draw
    # visit tokens by score, ties (the tokens of one word) by position: a word stays together
    order = jnp.argsort(jnp.where(candidate, score, 2.0), axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)  # [batch, length] place of each token in that order
    budget = jnp.round(rate * candidate.sum(1, keepdims=True))
    # a word is in when its last token is within the budget (words never split)
    word_end_rank = _word_last(rank, start_at)
    return candidate & (word_end_rank < budget)


def _word_last(values: Array, start_at: Array) -> Array:
    """For each token, the largest value over the tokens of its word ([batch, length])."""
    rows = jnp.arange(values.shape[0])[:, None]
    best = jnp.full(values.shape, -1, values.dtype).at[rows, start_at].max(values)
    return jnp.take_along_axis(best, start_at, axis=1)


class MlmTask(Documents):
    """Loss and metric sums for an encoder pretrained with masked-LM.

    Metric sums: loss_sum (nats over predicted positions), predictions, correct; with NSP also
    nsp_loss_sum, nsp_examples, nsp_correct.
    """

    lower_is_better = frozenset({"loss", "perplexity", "nsp_loss"})

    @staticmethod
    def rows(config: Config, splits: Corpus, tok: TextTokenizer) -> dict:
        """Packed token rows, or with `mlm.nsp` one sentence pair a row (eval pairs drawn with
        the eval seed, so they are the same whatever the run's seed)."""
        if not config.mlm.nsp:
            return pipeline.token_rows(splits, tok, config.data)
        stores = pipeline.token_stores(splits, tok, config.data)
        seeds = {"train": config.seed, "eval": rngs.EVAL_SEED}
        return {name: pairs.PairRows(stores[name], config.data.seq_len, seeds[name], tok.bos_id,
                                     tok.eos_id, tok.ends_sentence(), name) for name in seeds}

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> MlmTask:
        if tok.mask_id is None:
            raise UserError("task=mlm needs a mask token ([MASK] or <mask>) in the tokenizer; "
                            "train one (leave data.tokenizer empty) or load one that has it")
        return cls(config.model, config.mlm, config.data.seq_len, config.seed, tok.special_ids(),
                   tok.continues_word(), tok.mask_id)

    def __init__(self, model_cfg: ModelConfig, mlm: MlmConfig, seq_len: int, seed: int,
                 special_ids: np.ndarray, continues_word: np.ndarray, mask_id: int):
        self.model = EncoderMLM(model_cfg, nsp=mlm.nsp)
        self.batch_keys = ("inputs", "segment_ids", "positions", "row_ids")
        self.terms = (("loss_sum", "predictions"),)
        if mlm.nsp:
            self.batch_keys += ("token_types", "nsp_labels")
            self.terms += (("nsp_loss_sum", "nsp_examples"),)
        self.cfg, self.seq_len, self.seed = mlm, seq_len, seed
        self.predictions = max_predictions(mlm.mask_rate, seq_len)
        self._special = np.zeros(model_cfg.vocab_size, bool)
        self._special[special_ids] = True
        self._special[len(continues_word):] = True  # padding rows of the table are never text
        self._continues = np.zeros(model_cfg.vocab_size, bool)
        self._continues[: len(continues_word)] = continues_word
        self._text_ids = np.nonzero(~self._special)[0].astype(np.int32)
        self.mask_id = mask_id
        self.vocab = len(continues_word)  # the tokenizer's ids: the softmax's

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        batch = {k: np.ones((batch_size, seq_len), np.int32) for k in self.batch_keys}
        batch["row_ids"] = np.zeros((batch_size, 2), np.uint32)
        if self.cfg.nsp:
            batch["nsp_labels"] = np.zeros(batch_size, np.int32)
        return batch

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random text tokens, one document (or pair) a row, random row ids (benchmarks)."""
        batch = self.dummy_batch(batch_size, seq_len)
        batch["inputs"] = rng.choice(self._text_ids, (batch_size, seq_len)).astype(np.int32)
        batch["positions"] = one_document_a_row(batch_size, seq_len)
        batch["row_ids"] = rng.integers(0, 2 ** 32, (batch_size, 2), dtype=np.uint32)
        if self.cfg.nsp:
            batch["token_types"] = (np.arange(seq_len) >= seq_len // 2).astype(np.int32)[None].repeat(batch_size, 0)
            batch["nsp_labels"] = rng.integers(0, 2, batch_size, dtype=np.int32)
        return batch

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of a forward pass: bidirectional blocks, the pooler (and NSP), and the
        MLM head (transform and output layer) on the gathered positions only."""
        cfg = self.model.cfg
        picked = batch_size * self.predictions
        pooled = flops.dense(batch_size, cfg.embed_dim, cfg.embed_dim)
        nsp = flops.dense(batch_size, cfg.embed_dim, 2) if self.cfg.nsp else 0.0
        head = flops.dense(picked, cfg.embed_dim, cfg.embed_dim) + flops.dense(picked, cfg.embed_dim, cfg.vocab_size)
        return flops.blocks(cfg, batch_size, seq_len, causal=False) + pooled + nsp + head

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        tokens = batch["inputs"]
        masked = jnp.zeros((tokens.shape[0], self.predictions), jnp.int32)
        return self.model.init(rng, tokens, _types(batch), batch["segment_ids"], batch["positions"], masked)

    def corrupt(self, batch: dict[str, Array], train: bool = True) -> tuple[Array, Array, Array, Array]:
        """(inputs with masks applied, gathered positions [batch, P], their targets, their weights).

        Training masks come from the run's seed, eval masks from the eval seed.
        """
        tokens = batch["inputs"]  # [batch, length]
        root = jax.random.key(self.seed if train else rngs.EVAL_SEED)
        keys = jax.vmap(lambda r: rngs.stream(root, rngs.MASKS, r[0], r[1]))(batch["row_ids"])
        draws = jax.vmap(lambda k: jax.random.uniform(k, (3, tokens.shape[1])))(keys)  # [batch, 3, length]
        special = jnp.asarray(self._special)[tokens] | (batch["segment_ids"] == 0)
        if self.cfg.whole_word:
            after_special = jnp.pad(special[:, :-1], ((0, 0), (1, 0)), constant_values=True)
            word_start = ~jnp.asarray(self._continues)[tokens] | special | after_special
        else:
            word_start = jnp.ones_like(special)
        chosen = select(draws[:, 0], ~special, word_start, self.cfg.mask_rate)
        action = draws[:, 1]  # < 0.8: mask; < 0.9: random token; else keep
        text_ids = jnp.asarray(self._text_ids)  # random replacements are real, non-special tokens
        random_tokens = text_ids[(draws[:, 2] * len(self._text_ids)).astype(jnp.int32)]
        corrupted = jnp.where(chosen & (action < 0.8), self.mask_id,
                              jnp.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, tokens))
        index = jnp.arange(tokens.shape[1])
        picked = jnp.argsort(jnp.where(chosen, index, tokens.shape[1] + index), axis=1)[:, : self.predictions]
        weights = jnp.take_along_axis(chosen, picked, axis=1).astype(jnp.float32)
        targets = jnp.take_along_axis(tokens, picked, axis=1)
        return corrupted, picked, targets, weights

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        """The loss's denominators over `batch` (the masks are a function of the rows)."""
        out = {"predictions": self.corrupt(batch)[3].sum()}
        if self.cfg.nsp:
            out["nsp_examples"] = (batch["nsp_labels"] >= 0).sum().astype(jnp.float32)
        return out

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        inputs, picked, targets, weights = self.corrupt(batch, train)
        logits, nsp_logits = self.model.apply(
            {"params": params}, inputs, _types(batch), batch["segment_ids"], batch["positions"],
            picked, deterministic=not train, rngs={"dropout": rng})  # [batch, P, vocab], [batch, 2]
        loss_sum, correct = token_sums(logits, targets, weights, self.vocab)
        sums = {"loss_sum": loss_sum, "predictions": weights.sum(), "correct": correct}
        if self.cfg.nsp:
            labels = batch["nsp_labels"]  # [batch]
            real = (labels >= 0).astype(jnp.float32)
            nsp = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, jnp.maximum(labels, 0))
            sums.update(nsp_loss_sum=(nsp * real).sum(), nsp_examples=real.sum(),
                        nsp_correct=((nsp_logits.argmax(-1) == labels) * real).sum())
        return objective(sums, self.terms, totals), sums

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        out = token_metrics(sums, "predictions")
        if "nsp_examples" in sums:
            pairs = max(float(sums["nsp_examples"]), 1.0)
            out.update(nsp_loss=float(sums["nsp_loss_sum"]) / pairs,
                       nsp_accuracy=float(sums["nsp_correct"]) / pairs)
        return out


def _types(batch: dict[str, Array]) -> Array:
    """Token types: 0 for A and 1 for B of a pair; all 0 for packed MLM-only rows."""
    return batch["token_types"] if "token_types" in batch else jnp.zeros_like(batch["inputs"])
