"""Encoder-decoder objectives: teacher-forced cross-entropy on the target, with label smoothing,
over parallel text (`task=seq2seq`) or T5's span corruption of raw text (`task=span_corruption`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import Config, ModelConfig, Seq2seqConfig
from jaxlm.data import packing, parallel, pipeline, sources, spans
from jaxlm.data.sources import Corpus, Splits
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.metrics import objective, text_scores, token_losses, token_metrics
from jaxlm.microbatch import Layout
from jaxlm.models import flops
from jaxlm.models.encoder_decoder import EncoderDecoder
from jaxlm.tasks.base import SplitRows, one_document_a_row

Array = jax.Array


class EncoderDecoderTask:
    """Loss and metric sums for an encoder-decoder on rows of sources and targets
    (`jaxlm.data.parallel.KEYS`).

    Metric sums (divided on the host, after aggregation over devices and steps):
      loss_sum   summed label-smoothed token cross-entropy (what is minimised)
      nll_sum    summed plain cross-entropy in nats (perplexity)
      tokens     target tokens predicted (the EOS included)
      correct    tokens whose target has the largest logit
    """

    batch_keys = parallel.KEYS
    terms = (("loss_sum", "tokens"),)
    lower_is_better = frozenset({"loss", "perplexity"})

    def __init__(self, model_cfg: ModelConfig, cfg: Seq2seqConfig, vocab: int):
        self.model = EncoderDecoder(model_cfg)
        self.target_len, self.smoothing = cfg.target_len, cfg.label_smoothing
        self.vocab = vocab  # the tokenizer's ids and the task's: the softmax's (the table's padding is not text)

    extra_ids = 0  # vocabulary ids the task adds after the tokenizer's

    @staticmethod
    def resolve(config: Config) -> Config:
        return config

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> EncoderDecoderTask:
        return cls(config.model, config.seq2seq, tok.vocab_size + cls.extra_ids)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes: sources of `seq_len`, targets of `target_len`."""
        return {k: np.ones((batch_size, seq_len if k.startswith("input") else self.target_len), np.int32)
                for k in self.batch_keys}

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random sources and targets, one pair a row, no padding (benchmarks)."""
        vocab, t = self.vocab, self.target_len
        target = rng.integers(0, vocab, (batch_size, t + 1), dtype=np.int32)
        return {"inputs": rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32),
                "input_segments": np.ones((batch_size, seq_len), np.int32),
                "input_positions": one_document_a_row(batch_size, seq_len),
                "targets_in": target[:, :-1], "targets": target[:, 1:],
                "target_segments": np.ones((batch_size, t), np.int32),
                "target_positions": one_document_a_row(batch_size, t)}

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of a forward pass: both stacks (the decoder's cross-attention included),
        the output layer on every target token and the copy head, if any."""
        cfg = self.model.cfg
        decoder = cfg.decoder_layers or cfg.num_layers
        return (flops.blocks(cfg, batch_size, seq_len, causal=False)
                + flops.blocks(cfg, batch_size, self.target_len, causal=True, layers=decoder)
                + decoder * flops.cross_attention(cfg, batch_size, seq_len, self.target_len)
                + flops.dense(batch_size * self.target_len, cfg.embed_dim, cfg.vocab_size)
                + (flops.copy_head(cfg, batch_size, seq_len, self.target_len) if cfg.copy_attention else 0.0))

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        return self.model.init(rng, *(batch[k] for k in self.batch_keys if k != "targets"))

    @staticmethod
    def weights(batch: dict[str, Array]) -> Array:
        """[batch, target] 1.0 on the target tokens the loss counts."""
        return (batch["target_segments"] != 0).astype(jnp.float32)

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        return {"tokens": self.weights(batch).sum()}

    def logits(self, params: dict, batch: dict[str, Array], train: bool = False, rng: Array | None = None) -> Array:
        """Teacher-forced logits [batch, target, vocab]."""
        args = (batch[k] for k in self.batch_keys if k != "targets")
        return self.model.apply({"params": params}, *args, deterministic=not train,
                                rngs={"dropout": rng} if rng is not None else {})

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        """Mean label-smoothed token loss (over `totals` when given) and metric sums: the target
        gets 1 - smoothing of the probability, the rest spread evenly over the ids the softmax covers:
        the tokenizer's and the task's (T5's sentinels), not the table's padding."""
        logits = self.logits(params, batch, train, rng)  # [batch, target, vocab]
        weights = self.weights(batch)
        losses, nll, correct = token_losses(logits, batch["targets"], self.smoothing, self.vocab)
        sums = {"loss_sum": (losses * weights).sum(), "nll_sum": (nll * weights).sum(),
                "tokens": weights.sum(), "correct": (correct * weights).sum()}
        return objective(sums, self.terms, totals), sums

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        """Loss (smoothed), perplexity (of the plain cross-entropy) and accuracy."""
        out = token_metrics(sums, "tokens")
        nll = float(sums["nll_sum"]) / max(float(sums["tokens"]), 1.0)
        out["perplexity"] = float(np.exp(min(nll, 50.0)))
        return out


class Seq2seqTask(EncoderDecoderTask):
    """Source/target pairs from parallel files (`task=seq2seq`), packed several to a row on both
    sides, scored on decoded outputs (BLEU, chrF, ROUGE) as well."""

    @staticmethod
    def load_splits(config: Config) -> Splits:
        if config.data.source == "tfds":
            return parallel.load_catalog(config.data, config.seq2seq)
        return parallel.load_splits(config.data, config.seq2seq)

    @staticmethod
    def rows(config: Config, splits: Splits, tok: TextTokenizer) -> SplitRows:
        s = config.seq2seq
        return SplitRows(lambda name: parallel.ParallelRows(getattr(splits, name), tok, config.data.seq_len,
                                                            s.target_len, s.prefix))

    def packer(self, rows: parallel.ParallelRows, layout: Layout, host_batch: int) -> packing.Packer:
        """Packs pairs several to a row on both sides (a target attends only to its own source),
        at sizes measured on `rows`."""
        return packing.packer_for(rows, layout, host_batch, parallel.SIDES)

    @staticmethod
    def decode_score(run, params: dict, rows: parallel.ParallelRows, limit: int | None = None
                     ) -> tuple[dict[str, float], dict[str, str]]:
        """BLEU, chrF and ROUGE of the first `limit` (None: all) rows' sources decoded by beam
        search (`seq2seq.eval_beam_size`), and the hypotheses file they were scored from."""
        from jaxlm.seq2seq_infer import Translator  # (it builds on the workdir, which builds tasks)
        s = run.config.seq2seq
        count = len(rows.sources) if limit is None else min(limit, len(rows.sources))
        hypotheses = Translator(run, params, s.target_len, s.eval_beam_size, s.length_penalty,
                                s.no_repeat_ngram)(rows.sources[:count])
        return text_scores(hypotheses, rows.references[:count]), {"hypotheses.txt": "".join(h + "\n" for h in hypotheses)}


class SpanCorruptionTask(EncoderDecoderTask):
    """T5's pretraining objective on raw text (`task=span_corruption`): random spans of each
    token-store row replaced by sentinels in the source, restored in the target
    (`jaxlm.data.spans`). Its rows come full from the store, so they are not packed."""

    extra_ids = spans.SENTINELS

    @staticmethod
    def load_splits(config: Config) -> Corpus:
        return sources.load_corpus(config.data)

    @staticmethod
    def rows(config: Config, corpus: Corpus, tok: TextTokenizer) -> dict[str, spans.SpanRows]:
        s = config.seq2seq
        return {name: spans.SpanRows(rows, config.seed, s.noise_density, s.mean_span, tok.vocab_size, tok.bos_id,
                                     tok.eos_id, s.target_len)
                for name, rows in pipeline.token_rows(corpus, tok, config.data).items()}

    def packer(self, rows: spans.SpanRows, layout: Layout, host_batch: int) -> None:
        return None
