"""T5's span corruption: random spans of a row's tokens replaced by sentinels, to be restored.

A row of the token store (its real tokens) is cut to fit: `noise_density` of its tokens fall in
about `length * noise_density / mean_span` spans, the spans and the gaps between them of random
lengths (T5's `random_spans_noise_mask`; the row starts with a gap). The source is the row with
each span replaced by its sentinel, then EOS; the target is each sentinel followed by its span,
then EOS. Sentinels are the ids right after the tokenizer's (`SENTINELS` of them), the first
span's first. Draws are keyed by the seed and the row's global index, so a resumed run and any
mesh or process count corrupt each row alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.data.parallel import KEYS

SENTINELS = 100  # extra ids after the tokenizer's, as T5's <extra_id_0> .. <extra_id_99>
_STREAM = 0x5A7  # the span draws' own random stream


def _segments(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `count` non-empty segments at random: their lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), count - 1, replace=False)) if count > 1 else np.zeros(0, int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """[length] booleans, True on the tokens of the noise spans (T5's random_spans_noise_mask)."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    spans = min(spans, noise, length - noise)
    lengths = np.stack([_segments(length - noise, spans, rng), _segments(noise, spans, rng)], 1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray, first_sentinel: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of `tokens` with the spans `mask` marks (see the module docstring)."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # each span's first token
    sentinel = first_sentinel + np.cumsum(starts) - 1  # [length]: the sentinel of each token's span
    source = np.where(starts, sentinel, tokens)[~mask | starts]
    target = np.stack([np.where(starts, sentinel, -1), tokens], 1)[mask].reshape(-1)  # [sentinel,] token, ...
    return np.append(source, eos).astype(np.int32), np.append(target[target >= 0], eos).astype(np.int32)


class SpanRows:
    """Random-access span-corrupted rows over language-model rows (see the module docstring),
    in the layout of sequence-to-sequence rows (`jaxlm.data.parallel.KEYS`)."""

    def __init__(self, rows: Any, seed: int, density: float, mean_span: float, first_sentinel: int, bos: int,
                 eos: int, target_len: int):
        self.rows, self.seed, self.density, self.mean_span = rows, seed, density, mean_span
        self.first_sentinel, self.bos, self.eos = first_sentinel, bos, eos
        self.seq_len, self.target_len = rows.seq_len, target_len

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, source, target) of row `r`: the tokens corrupted, cut so both sides fit."""
        row = self.rows[r]
        tokens = row["inputs"][row["segment_ids"] > 0][: self.seq_len - 1]  # room for EOS
        rng = np.random.default_rng([self.seed, _STREAM, int(r)])
        while True:
            if len(tokens) < 2:
                return tokens, np.append(tokens, self.eos).astype(np.int32), np.asarray([self.eos], np.int32)
            mask = noise_mask(len(tokens), self.density, self.mean_span, rng)
            source, target = corrupt(tokens, mask, self.first_sentinel, self.eos)
            if len(target) <= self.target_len:
                return tokens, source, target
            tokens = tokens[: len(tokens) * self.target_len // len(target)]  # a shorter row, drawn again

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        _, source, target = self.pair(r)
        out = self.empty()
        out["inputs"][:len(source)], out["input_segments"][:len(source)] = source, 1
        out["input_positions"][:len(source)] = np.arange(len(source))
        out["targets"][:len(target)], out["target_segments"][:len(target)] = target, 1
        out["targets_in"][:len(target)] = np.concatenate([[self.bos], target[:-1]])
        out["target_positions"][:len(target)] = np.arange(len(target))
        return out

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row (no tokens; weight zero)."""
        return {k: np.zeros(self.seq_len if k.startswith("input") else self.target_len, np.int32) for k in KEYS}
