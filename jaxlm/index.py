"""`python -m jaxlm.index`: passage embeddings for retrieval over a knowledge base.

    python -m jaxlm.index build --workdir E --input PASSAGES --out INDEX [--max-tokens N]
    python -m jaxlm.index query --index INDEX [--top-k K] [QUESTION ...] [--input FILE]

`build` reads documents (a text file, one a line, or JSONL of {"id", "text"}), cuts each into
passages of at most `--max-tokens` tokens, embeds them with the encoder of workdir E (mean of
the last hidden states over a passage's tokens, L2-normalized: how all-MiniLM-L6-v2 is meant to
be used) and writes INDEX/: `embeddings.npy` [passages, width], `passages.jsonl` (id, document
id, text) and `index.json` (the encoder workdir and step, sizes). No pickle anywhere.

`query` embeds each question with the same encoder and prints the top-k passages by cosine
similarity. Search is exact (one matrix product), which is what a few hundred thousand passages
need; with millions, put the same vectors in an approximate nearest-neighbour index (FAISS
IVF/HNSW, ScaNN) and keep the embedding code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxlm import encoder_infer
from jaxlm.errors import UserError, cli
from jaxlm.workdir import Run, open_run

ENCODER_TASKS = ("mlm", "classify", "qa")


def read_documents(path: Path) -> list[tuple[str, str]]:
    """(id, text) of each document of a text file (one a line; ids are line numbers) or JSONL."""
    if not path.is_file():
        raise UserError(f"--input '{path}' not found; give a text file (one document a line) or JSONL of "
                        '{"id", "text"}')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text") from None
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            docs.append((str(number), line.strip()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{number}: needs a "text" string (and an optional "id")')
        docs.append((str(record.get("id", number)), record["text"]))
    if not docs:
        raise UserError(f"'{path}' holds no documents")
    return docs


def cut_passages(run: Run, docs: list[tuple[str, str]], max_tokens: int) -> list[dict[str, str]]:
    """Each document as passages of at most `max_tokens` tokens (with [CLS] and [SEP]), cut at
    token boundaries; a passage keeps its document's id (and `#k` after it when cut)."""
    out = []
    room = max_tokens - 2
    tok = run.tokenizer
    for (doc_id, text), encoding in zip(docs, tok.tokenizer.encode_batch([t for _, t in docs],
                                                                         add_special_tokens=False)):
        offsets, pieces, i = encoding.offsets, [], 0
        while i < len(offsets):
            j = min(i + room, len(offsets))
            # a piece tokenized on its own may take a token more than it did in place: cut earlier
            while j > i + 1 and len(tok.encode(text[offsets[i][0]:offsets[j - 1][1]].strip())) > room:
                j -= 1
            pieces.append(text[offsets[i][0]:offsets[j - 1][1]].strip())
            i = j
        for k, piece in enumerate(pieces):
            out.append({"id": doc_id if len(pieces) == 1 else f"{doc_id}#{k}", "document": doc_id, "text": piece})
    return out


def open_encoder(workdir: str | Path, step: int | None = None) -> tuple[Run, dict, int]:
    """(run, params, step) of an encoder workdir."""
    run, ckpt = open_run(workdir)
    if run.config.task not in ENCODER_TASKS:
        raise UserError(f"'{workdir}' trains task={run.config.task}; embeddings need an encoder run "
                        f"(task {', '.join(ENCODER_TASKS)}), e.g. an imported all-MiniLM-L6-v2")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, step)
    return run, params, step


def build(workdir: str | Path, documents: Path, out: Path, max_tokens: int, batch_size: int = 64) -> int:
    """Writes the index of `documents` to `out`; returns the number of passages."""
    run, params, step = open_encoder(workdir)
    max_tokens = min(max_tokens, run.config.model.max_len)
    passages = cut_passages(run, read_documents(documents), max_tokens)
    start = time.time()
    vectors = encoder_infer.embed(run, params, [p["text"] for p in passages], max_tokens, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", vectors, allow_pickle=False)
    (out / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    meta = {"encoder": str(Path(workdir).resolve()), "step": step, "passages": len(passages),
            "width": int(vectors.shape[1]), "max_tokens": max_tokens, "pooling": "mean, L2-normalized"}
    (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"embedded {len(passages)} passages of {documents} in {time.time() - start:.1f}s -> {out}",
          file=sys.stderr)
    return len(passages)


class Index:
    """A built index: its passages, their embeddings and the encoder that made them."""

    def __init__(self, path: str | Path, encoder_workdir: str | Path | None = None):
        path = Path(path)
        if not (path / "index.json").is_file():
            raise UserError(f"'{path}' is not an index; build one with python -m jaxlm.index build")
        self.meta = json.loads((path / "index.json").read_text())
        try:
            self.vectors = np.load(path / "embeddings.npy", allow_pickle=False)  # [passages, width]
            self.passages = [json.loads(line) for line in
                             (path / "passages.jsonl").read_text(encoding="utf-8").splitlines()]
        except (OSError, ValueError) as e:
            raise UserError(f"'{path}' is damaged ({str(e).splitlines()[0][:120]}); build it again") from None
        if len(self.passages) != len(self.vectors):
            raise UserError(f"'{path}' is damaged: {len(self.passages)} passages but {len(self.vectors)} "
                            "embeddings; build it again")
        self.run, self.params, _ = open_encoder(encoder_workdir or self.meta["encoder"], self.meta["step"])

    def search(self, questions: list[str], top_k: int) -> list[list[tuple[float, dict[str, str]]]]:
        """The `top_k` (cosine, passage) of each question, best first."""
        queries = encoder_infer.embed(self.run, self.params, questions, self.meta["max_tokens"])
        scores = queries @ self.vectors.T  # [questions, passages]
        best = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return [[(float(scores[q, i]), self.passages[i]) for i in row] for q, row in enumerate(best)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.index", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="embed the passages of documents into an index")
    b.add_argument("--workdir", required=True, help="an encoder run (e.g. an imported all-MiniLM-L6-v2)")
    b.add_argument("--input", required=True, help='documents: a text file (one a line) or JSONL of {"id", "text"}')
    b.add_argument("--out", required=True, help="the index directory to write")
    b.add_argument("--max-tokens", type=int, default=256, help="longest passage, in tokens (at most model.max_len)")
    b.add_argument("--batch-size", type=int, default=64)
    q = commands.add_parser("query", help="the passages nearest to questions")
    q.add_argument("--index", required=True, help="an index directory")
    q.add_argument("text", nargs="*", help="questions")
    q.add_argument("--input", help="a file with one question a line")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--workdir", help="the encoder run (default: the one that built the index)")
    return parser.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "build":
        if args.max_tokens < 8 or args.batch_size < 1:
            raise UserError("--max-tokens must be at least 8 and --batch-size at least 1")
        build(args.workdir, Path(args.input), Path(args.out), args.max_tokens, args.batch_size)
        return
    questions = list(args.text)
    if args.input:
        if not Path(args.input).is_file():
            raise UserError(f"--input '{args.input}' not found; give a file with one question a line")
        questions += [line for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions or args.top_k < 1:
        raise UserError("give at least one question (QUESTION or --input FILE) and --top-k >= 1")
    index = Index(args.index, args.workdir)
    for question, hits in zip(questions, index.search(questions, args.top_k)):
        print(question)
        for rank, (score, passage) in enumerate(hits, 1):
            print(f"  {rank}. {score:.4f}  [{passage['id']}]  {passage['text'][:200]}", flush=True)


if __name__ == "__main__":
    main()
