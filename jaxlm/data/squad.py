"""Question answering data: SQuAD v1.1 / v2.0 JSON files or a TFDS catalog dataset, and their
windows.

An example is a question, its context and its gold answers (character spans of the context;
none where SQuAD 2.0 marks the question unanswerable). A context longer than a row is cut into
overlapping windows of tokens, each a row `[CLS] question [SEP] window [SEP]`; the answer's
character span maps to token positions through the tokenizer's offsets, and a window that does
not hold the whole answer (or a question without one) points at `[CLS]` (position 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.config import DataConfig, QAConfig
from jaxlm.data.catalog import open_catalog, split_records
from jaxlm.data.sources import Splits, _fingerprint, _is_eval, as_text, expand_paths
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

KEYS = ("inputs", "token_types", "segment_ids", "positions", "starts", "ends")


def _example(qid: str, question: str, context: str, answers: list[tuple[str, int]], impossible: bool,
             where: str) -> dict[str, Any]:
    """One example, its answers checked against the context."""
    for text, start in answers:
        if context[start:start + len(text)] != text:
            raise UserError(f"{where}: question {qid}: answer {text!r} is not at answer_start={start} of its "
                            f"context (there: {context[start:start + len(text)]!r}); fix the offset")
    if not answers and not impossible:
        raise UserError(f"{where}: question {qid} has no answers and is not marked is_impossible")
    return {"id": qid, "question": question, "context": context,
            "answers": [{"text": t, "start": s} for t, s in answers], "impossible": impossible}


def read_file(path: Path) -> list[dict[str, Any]]:
    """The examples of one SQuAD-format JSON file (`data[].paragraphs[].qas[]`)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text; SQuAD files are UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"'{path}' is not in SQuAD format: expected {{\"data\": [{{\"paragraphs\": [...]}}]}}")
    out = []
    try:
        for article in doc["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = [(a["text"], int(a["answer_start"])) for a in qa.get("answers", [])]
                    out.append(_example(str(qa["id"]), qa["question"], context, answers,
                                        bool(qa.get("is_impossible", False)), str(path)))
    except (KeyError, TypeError) as e:
        raise UserError(f"'{path}' is not in SQuAD format: a paragraph or question lacks {e}") from None
    if not out:
        raise UserError(f"'{path}' holds no questions")
    return out


def load_splits(data: DataConfig) -> Splits:
    """Train and eval examples from SQuAD JSON files (`data.paths`, `data.eval_paths`); without
    eval files, a stable hashed share of the questions is held out."""
    train_files = expand_paths(data.paths, "data.paths")
    eval_files = expand_paths(data.eval_paths, "data.eval_paths") if data.eval_paths else []
    train = [e for p in train_files for e in read_file(p)]
    held = [e for p in eval_files for e in read_file(p)]
    if not eval_files:
        held = [e for e in train if _is_eval(e["id"], data.eval_fraction)]
        train = [e for e in train if not _is_eval(e["id"], data.eval_fraction)]
    stat = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in train_files + eval_files]
    return Splits(train, held, "context", _fingerprint(["squad", stat, len(train_files), data.eval_fraction]))


def load_catalog(data: DataConfig) -> Splits:
    """Train and eval examples of a TFDS catalog dataset in SQuAD's features (`squad`,
    `squad/v2.0`): id, question, context, answers {text, answer_start}, is_impossible."""
    builder, train, held = open_catalog(data)
    features = builder.info.features
    missing = [k for k in ("id", "question", "context", "answers") if k not in features]
    if missing:
        raise UserError(f"{data.name} is not a SQuAD-style dataset: it lacks {', '.join(missing)}")

    def read(source: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for r in split_records(source):
            answers = [(as_text(t), int(s)) for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
            out.append(_example(as_text(r["id"]), as_text(r["question"]), as_text(r["context"]), answers,
                                bool(r.get("is_impossible", False)), data.name))
        return out

    fp = _fingerprint(["tfds-squad", data.name, data.train_split, data.eval_split, data.eval_fraction])
    return Splits(read(train), read(held), "context", fp)


class QARows:
    """Random-access windows of examples: rows for the span head, and what maps them back.

    Per window: `example` (its example's index), `offsets` [seq_len, 2] (each context token's
    character span in the context, -1 elsewhere) and the `starts` / `ends` labels (0 where the
    window does not hold the answer).
    """

    def __init__(self, examples: Sequence[dict[str, Any]], tokenizer: TextTokenizer, seq_len: int,
                 cfg: QAConfig):
        self.examples, self.seq_len = examples, seq_len
        if cfg.doc_stride >= seq_len - cfg.max_question_tokens - 3:
            raise UserError(f"qa.doc_stride={cfg.doc_stride} leaves a window no new context: keep it below "
                            f"data.seq_len - qa.max_question_tokens - 3 = {seq_len - cfg.max_question_tokens - 3}")
        cls, sep = tokenizer.bos_id, tokenizer.eos_id
        inputs, types, lengths, example, offsets, starts, ends = [], [], [], [], [], [], []
        questions = tokenizer.encode_batch([e["question"] for e in examples])
        contexts = tokenizer.tokenizer.encode_batch([e["context"] for e in examples], add_special_tokens=False)
        for i, (e, q, c) in enumerate(zip(examples, questions, contexts)):
            q = q[:cfg.max_question_tokens]
            room = seq_len - len(q) - 3  # context tokens a window holds
            first = len(q) + 2  # row position of the window's first context token
            answer = _token_span(c.offsets, e["answers"][0]) if e["answers"] else None
            for begin in window_starts(len(c.ids), room, cfg.doc_stride):
                end = min(begin + room, len(c.ids))
                ids = [cls, *q, sep, *c.ids[begin:end], sep]
                row = np.zeros(seq_len, np.int32)
                row[:len(ids)] = ids
                inputs.append(row)
                lengths.append(len(ids))
                kind = np.zeros(seq_len, np.int32)
                kind[first:len(ids)] = 1
                types.append(kind)
                spans = np.full((seq_len, 2), -1, np.int32)
                spans[first:first + end - begin] = c.offsets[begin:end]
                offsets.append(spans)
                example.append(i)
                inside = answer is not None and begin <= answer[0] and answer[1] < end
                starts.append(first + answer[0] - begin if inside else 0)
                ends.append(first + answer[1] - begin if inside else 0)
        self.inputs, self.types = np.stack(inputs), np.stack(types)
        self.lengths = np.asarray(lengths, np.int32)
        self.example = np.asarray(example, np.int32)
        self.offsets = np.stack(offsets)
        self.starts, self.ends = np.asarray(starts, np.int32), np.asarray(ends, np.int32)

    def __len__(self) -> int:
        return len(self.example)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        real = (np.arange(self.seq_len) < self.lengths[i]).astype(np.int32)
        return {"inputs": self.inputs[i], "token_types": self.types[i], "segment_ids": real,
                "positions": np.arange(self.seq_len, dtype=np.int32),
                "starts": self.starts[i], "ends": self.ends[i]}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding window (no tokens; label -1, weight zero)."""
        zeros = np.zeros(self.seq_len, np.int32)
        return {"inputs": zeros, "token_types": zeros, "segment_ids": zeros, "positions": zeros,
                "starts": np.int32(-1), "ends": np.int32(-1)}


def window_starts(tokens: int, room: int, overlap: int) -> list[int]:
    """First context token of each window: windows of `room` tokens, each sharing `overlap`
    tokens with the one before, until one reaches the end (one window for a short context)."""
    starts = [0]
    while starts[-1] + room < tokens:
        starts.append(starts[-1] + room - overlap)
    return starts


def _token_span(offsets: list[tuple[int, int]], answer: dict[str, Any]) -> tuple[int, int] | None:
    """(first, last) context token of an answer's character span: the tokens it overlaps."""
    begin, end = answer["start"], answer["start"] + len(answer["text"])
    covered = [i for i, (a, b) in enumerate(offsets) if a < end and b > begin]
    return (covered[0], covered[-1]) if covered else None
