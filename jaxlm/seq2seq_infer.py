"""Inference with an encoder-decoder run: translate or summarize texts, greedy or by beam search.

Used by `python -m jaxlm.infer translate|summarize` and by `evaluate` on a sequence-to-sequence
run. Sources are encoded once; the decoder starts from BOS and reads the encoder's keys and
values from its cache (`jaxlm.models.encoder_decoder.decoding_cache`). An output ends at its
end token, at `max_new_tokens`, or at `seq2seq.max_length_ratio` times its source's tokens
(prefix and end token counted) + `seq2seq.max_length_offset`, whichever comes first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import decoding
from jaxlm.data.parallel import ParallelRows
from jaxlm.errors import UserError
from jaxlm.models.encoder_decoder import PER_SOURCE, cache_batch_axes, cached_logits, decoding_cache
from jaxlm.workdir import Run


class Translator:
    """Batched decoding of a sequence-to-sequence run: one compiled function per (batch, beam)."""

    def __init__(self, run: Run, params, max_new_tokens: int, beam_size: int = 1, length_penalty: float = 0.6,
                 no_repeat_ngram: int = 0):
        if beam_size < 1 or max_new_tokens < 1:
            raise UserError(f"--beam-size={beam_size} and --max-new-tokens={max_new_tokens} must be at least 1")
        if length_penalty < 0 or no_repeat_ngram < 0:
            raise UserError(f"--length-penalty={length_penalty} and --no-repeat-ngram={no_repeat_ngram} must be at least 0")
        self.run, self.params, self.tok = run, params, run.tokenizer
        self.max_new_tokens, self.beam_size, self.alpha = max_new_tokens, beam_size, length_penalty
        self.no_repeat_ngram = no_repeat_ngram
        self.ratio, self.offset = run.config.seq2seq.max_length_ratio, run.config.seq2seq.max_length_offset
        self._fn = jax.jit(self._decode)

    def _decode(self, params, inputs, segments, positions):
        model, tok = self.run.task.model, self.tok
        cache = decoding_cache(model, params, inputs, segments, positions, 1 + self.max_new_tokens)
        logits = cached_logits(model, params, tok.vocab_size)
        start = jnp.full((inputs.shape[0], 1), tok.bos_id, jnp.int32)
        limits = jnp.full(inputs.shape[:1], self.max_new_tokens)
        if self.ratio > 0:
            source = (segments > 0).sum(axis=1)
            limits = jnp.minimum(limits, jnp.ceil(self.ratio * source).astype(jnp.int32) + self.offset)
        settings = dict(max_new_tokens=self.max_new_tokens, eos_id=tok.end_ids, pad_id=tok.pad_id, limits=limits,
                        no_repeat_ngram=self.no_repeat_ngram)
        if self.beam_size == 1:
            return decoding.generate(logits, cache, start, jnp.ones_like(start), jax.random.key(0),
                                     temperature=0.0, **settings)
        tokens, _ = decoding.beam_search(logits, cache, start, jnp.ones_like(start), self.beam_size, alpha=self.alpha,
                                         cache_batch_axis=cache_batch_axes(model.cfg, cache), per_prompt=PER_SOURCE,
                                         **settings)
        return tokens[:, 0]

    def __call__(self, texts: list[str], batch_size: int = 32) -> list[str]:
        """The outputs of `texts` (prefixed with `seq2seq.prefix` and cut to `data.seq_len`), in
        their order. Sources are decoded longest first, so that the texts of a batch end at about
        the same step, and every batch has one shape (one compilation): `batch_size` rows, or
        fewer texts rounded up to the mesh's batch axes, filled with empty sources."""
        if not texts:
            return []
        cfg = self.run.config
        mesh = self.run.compiled.mesh.shape
        rows_multiple = mesh["data"] * mesh["fsdp"]
        size = min(batch_size, len(texts))
        size += -size % rows_multiple  # fill the mesh's batch axes
        rows = ParallelRows([{"source": t, "target": ""} for t in [*texts, ""]], self.tok, cfg.data.seq_len, 1,
                            cfg.seq2seq.prefix)
        order = np.argsort(-rows.source_lengths[:-1], kind="stable")
        out: list[str] = [""] * len(texts)
        for first in range(0, len(order), size):
            chunk = order[first:first + size]
            picked = [*chunk, *[len(texts)] * (size - len(chunk))]  # the last row is the empty source
            batch = [np.stack([rows[i][k] for i in picked]) for k in ("inputs", "input_segments", "input_positions")]
            with self.run.compiled.context():
                tokens = np.asarray(self._fn(self.params, *batch))
            for i, row in zip(chunk, tokens):
                out[i] = self.tok.generated_text(row.tolist())
        return out
