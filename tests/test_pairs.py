"""Next-sentence pairs: layout, labels, where A and B come from, determinism."""

import numpy as np
import pytest

from jaxlm.data import store
from jaxlm.data.pairs import IS_NEXT, RANDOM, PairRows
from jaxlm.errors import UserError

CLS, SEP, BOS = 1, 2, 3
SEQ_LEN = 24  # A + B hold at most 21 tokens


def write_split(directory, lengths, seed=0):
    """A token store (a shard per 50 documents) whose every text token is unique: token =
    10 + its stream index.

    Returns (store, doc of each stream index, sentence-end table).
    """
    rng = np.random.default_rng(seed)
    documents, doc_of, position = [], [], 0
    for d, n in enumerate(lengths):
        doc_of.append(-1)  # its BOS
        documents.append(10 + position + 1 + np.arange(n))
        doc_of.extend([d] * n)
        position += n + 1
    directory.mkdir(parents=True, exist_ok=True)
    shards = [store.write_shard(directory, k, documents[first:first + 50], BOS, np.dtype(np.uint32))
              for k, first in enumerate(range(0, len(documents), 50))]
    store.write_manifest(directory, shards, np.dtype(np.uint32), "tok", "test", BOS, SEP)
    ends = np.zeros(10 + position, bool)
    ends[10 + np.nonzero(rng.random(position) < 0.15)[0]] = True  # ~1 token in 7 ends a sentence
    return store.TokenStore(directory), np.asarray(doc_of), ends


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    lengths = np.random.default_rng(1).integers(0, 80, 300)
    lengths[:3] = [0, 1, 200]  # an empty document, a one-token one, a long one
    return write_split(tmp_path_factory.mktemp("pairs"), lengths)


def test_pairs_are_laid_out_as_bert_expects(split):
    tokens, _, ends = split
    rows = PairRows(tokens, SEQ_LEN, 0, CLS, SEP, ends)
    for r in range(0, len(rows), 7):
        a, b, label = rows.pair(r)
        row = rows[r]
        n = len(a) + len(b) + 3
        assert n <= SEQ_LEN and len(a) >= 1 and len(b) >= 1
        np.testing.assert_array_equal(row["inputs"][:n], [CLS, *a, SEP, *b, SEP])
        np.testing.assert_array_equal(row["token_types"][:n], [0] * (len(a) + 2) + [1] * (len(b) + 1))
        np.testing.assert_array_equal(row["segment_ids"], np.arange(SEQ_LEN) < n)
        assert (row["inputs"][n:] == 0).all() and (row["token_types"][n:] == 0).all()
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
        assert row["nsp_labels"] == label


def test_labels_say_where_b_comes_from(split):
    tokens, doc_of, ends = split
    rows = PairRows(tokens, SEQ_LEN, 0, CLS, SEP, ends)
    labels = []
    for r in range(len(rows)):
        a, b, label = rows.pair(r)
        labels.append(label)
        ia, ib = a - 10, b - 10  # stream indices
        assert (np.diff(ia) == 1).all() and (np.diff(ib) == 1).all()  # contiguous text
        assert len(set(doc_of[ia])) == 1 and len(set(doc_of[ib])) == 1
        chunk_end = rows.chunk_start[r] + rows.chunk_len[r]
        assert ia[0] == rows.chunk_start[r]  # A opens the chunk ...
        inside = ends[10 + np.arange(rows.chunk_start[r], chunk_end - 1)]
        assert not inside.any() or ends[a[-1]]  # ... and ends at a sentence end if it has one
        if label == IS_NEXT:
            assert ib[0] == ia[-1] + 1 and ib[-1] == chunk_end - 1  # B is the rest of the chunk
        else:
            assert label == RANDOM and doc_of[ib[0]] != doc_of[ia[0]]  # another document
            assert doc_of[ib[0] - 1] == -1 or ends[b[0] - 1]  # starting at a sentence start
    assert len(rows) > 700
    assert abs(np.mean(labels) - 0.5) < 0.05


def test_pairs_follow_the_seed_and_the_row(split):
    tokens, _, ends = split
    a = PairRows(tokens, SEQ_LEN, 0, CLS, SEP, ends)
    again = PairRows(tokens, SEQ_LEN, 0, CLS, SEP, ends)
    other = PairRows(tokens, SEQ_LEN, 1, CLS, SEP, ends)
    same = [all((a[r][k] == again[r][k]).all() for k in a[r]) for r in range(200)]
    differ = [a[r]["nsp_labels"] != other[r]["nsp_labels"] for r in range(200)]
    assert all(same) and 0.3 < np.mean(differ) < 0.7


def test_one_document_is_refused(tmp_path):
    tokens, _, ends = write_split(tmp_path, [100])
    with pytest.raises(UserError, match="eval split has 1 document.*needs at least 2"):
        PairRows(tokens, SEQ_LEN, 0, CLS, SEP, ends, split="eval")
    with pytest.raises(UserError, match="data.seq_len=4 is too short"):
        PairRows(tokens, 4, 0, CLS, SEP, ends)
