"""Next-sentence-prediction rows: `[CLS] A [SEP] B [SEP]` pairs cut from a tokenized split.

Each document's text (the tokenized split's stream, without its BOS) is cut into chunks of at
most `seq_len - 3` tokens; chunk `r` (of at least two tokens) makes row `r`. A is the chunk up
to a sentence end drawn at random (any token boundary when the chunk has no sentence end
inside). With probability 1/2, B is the rest of the chunk (label 0, "is next"); otherwise B is
as many tokens of another document, drawn at random, starting at one of its sentence starts
(label 1, "random"). Draws are keyed by the seed and the row, so row `r` is always the same
pair: rows stay random access, and a resumed run reads the pairs it would have read. The
masked-LM masks on top change every epoch (see `tasks/mlm.py`).

A row is a dict of int32 arrays [seq_len] (inputs, token_types, segment_ids, positions) and the
scalar `nsp_labels`.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.store import TokenStore
from jaxlm.errors import UserError

IS_NEXT, RANDOM = 0, 1  # Hugging Face's next_sentence_label convention


class PairRows:
    """Random-access NSP pairs over a token store (see the module docstring).

    Chunks are indexed in memory (about 24 bytes a chunk): unlike plain token rows, pairs do
    not keep memory flat as the corpus grows.
    """

    def __init__(self, tokens: TokenStore, seq_len: int, seed: int, cls_id: int, sep_id: int,
                 ends_sentence: np.ndarray, split: str = "train"):
        """ends_sentence: [vocab] bool, the token ends a sentence (a cut point for A and B)."""
        if seq_len < 5:
            raise UserError(f"data.seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP] pairs; use 5 or more")
        self.store = tokens  # a stream of BOS t1..tn per document
        starts = tokens.document_starts()
        self.tokens = tokens.tokens
        self.seq_len, self.seed, self.cls, self.sep = seq_len, seed, cls_id, sep_id
        self._ends = np.asarray(ends_sentence, bool)
        # each document's text span in the stream (its BOS dropped)
        self.doc_start = starts + 1
        self.doc_len = np.diff(np.append(starts, self.tokens)) - 1
        budget = seq_len - 3
        per_doc = -(-self.doc_len // budget)  # chunks per document
        doc = np.repeat(np.arange(len(starts)), per_doc)
        j = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        length = np.minimum(budget, self.doc_len[doc] - j * budget)
        keep = length >= 2
        self.chunk_doc, self.chunk_start, self.chunk_len = doc[keep], (self.doc_start[doc] + j * budget)[keep], length[keep]
        self._texts = np.nonzero(self.doc_len > 0)[0]  # documents a random B can come from
        if len(self.chunk_doc) and len(self._texts) < 2:
            raise UserError(f"the {split} split has {len(self._texts)} document(s); next-sentence "
                            "prediction draws B from another document, so it needs at least 2 "
                            "(give more text, or set mlm.nsp=false)")

    def __len__(self) -> int:
        return len(self.chunk_doc)

    def pair(self, r: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(A tokens, B tokens, label) of row r."""
        rng = np.random.default_rng([self.seed, int(r)])
        start, length, doc = int(self.chunk_start[r]), int(self.chunk_len[r]), int(self.chunk_doc[r])
        chunk = self.store.ids(start, start + length)
        cuts = self._after_ends(chunk)  # A ends after a sentence end, never at the chunk's end
        a_len = int(rng.choice(cuts)) if len(cuts) else int(rng.integers(1, length))
        if rng.random() < 0.5:
            return chunk[:a_len], chunk[a_len:], IS_NEXT
        k = int(rng.integers(len(self._texts) - 1))  # one of the documents other than A's
        other = int(self._texts[k + (k >= np.searchsorted(self._texts, doc))])
        text = self.store.ids(int(self.doc_start[other]), int(self.doc_start[other] + self.doc_len[other]))
        want = length - a_len
        starts = np.concatenate([[0], self._after_ends(text)])  # sentence starts
        fits = starts[starts + want <= len(text)]
        first = int(rng.choice(fits)) if len(fits) else max(0, len(text) - want)
        return chunk[:a_len], text[first:first + want], RANDOM

    def _after_ends(self, tokens: np.ndarray) -> np.ndarray:
        """Positions 1..len-1 of `tokens` that follow a sentence-ending token."""
        return np.nonzero(self._ends[tokens[:-1]])[0] + 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        a, b, label = self.pair(r)
        ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int32)
        n, pad = len(ids), self.seq_len - len(ids)
        types = np.concatenate([np.zeros(len(a) + 2, np.int32), np.ones(len(b) + 1, np.int32)])
        return {"inputs": np.pad(ids, (0, pad)), "token_types": np.pad(types, (0, pad)),
                "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
                "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
                "nsp_labels": np.int32(label)}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row: no tokens, no pair (label -1, counted nowhere)."""
        zeros = np.zeros(self.seq_len, np.int32)
        return {"inputs": zeros, "token_types": zeros, "segment_ids": zeros, "positions": zeros,
                "nsp_labels": np.int32(-1)}
